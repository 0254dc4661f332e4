"""Bootstrap confidence intervals for per-problem statistics (accuracy, pass@k), over problems and over seeds.

Problems are the unit of resampling: samples of one problem are correlated, so
resampling samples would understate the uncertainty of a benchmark score. When a
recipe was trained with several seeds, the seeds are a second unit: a seed that
shifts every problem together is variation of the recipe that a problem-only
bootstrap of the seed-averaged values never sees (``seed_problem_bootstrap_ci``).
"""

from __future__ import annotations

import torch

# Resampled index matrices are built in blocks of at most this many entries (int64: 64 MiB).
_BLOCK_ENTRIES = 1 << 23


def bootstrap_ci(
    values: torch.Tensor, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values`` (P,), one statistic per problem.

    Draws ``num_resamples`` sets of P problems with replacement (a CPU
    ``torch.Generator`` seeded with ``seed``, so the result depends only on the
    inputs) and returns the (1 - confidence)/2 and (1 + confidence)/2 quantiles
    of the resampled means, linearly interpolated. For accuracy pass per-problem
    correctness (or mean@n); for pass@k pass ``pass_at_k_per_problem(n, c, k)``.
    All-equal values give a zero-width interval.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"expected a non-empty (P,) tensor of per-problem values, got shape {tuple(values.shape)}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = values.detach().to("cpu", torch.float64)
    num_problems = data.numel()
    generator = torch.Generator().manual_seed(seed)
    block = max(1, _BLOCK_ENTRIES // num_problems)
    means = []
    for start in range(0, num_resamples, block):
        rows = min(block, num_resamples - start)
        indices = torch.randint(num_problems, (rows, num_problems), generator=generator)
        means.append(data[indices].mean(dim=1))
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(torch.cat(means), torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def paired_bootstrap_ci(
    a: torch.Tensor, b: torch.Tensor, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """The difference mean(a) - mean(b) of two systems on the same P problems, and its paired bootstrap interval.

    ``a[i]`` and ``b[i]`` are the two systems' statistics on problem i. Each resample draws P problems with
    replacement and takes both systems on those same problems, so problem difficulty, which both share, cancels:
    the interval is much narrower than one built from the two separate intervals. A resample's difference of
    means is the mean of its per-problem differences, so this is ``bootstrap_ci`` of ``a - b``.
    Returns (difference, low, high).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same problems, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    differences = a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)
    low, high = bootstrap_ci(differences, num_resamples, confidence, seed)
    return float(differences.mean()), low, high


def seed_problem_bootstrap_ci(
    arms: list[torch.Tensor],
    signs: list[float] | None = None,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A two-level (seeds, then problems) bootstrap of ``sum_j signs[j] * mean(arms[j])``; returns (value, low, high).

    Each ``arms[j]`` is (S_j, P): arm j's statistic per seed and problem, on the same P problems for every arm. A
    resample draws the P problems with replacement once, for every arm (paired over problems, as
    ``paired_bootstrap_ci``), and each arm's S_j seeds with replacement on their own (seeds of different arms are
    separate training runs, not pairs); the statistic is the signed sum of the arms' means over their drawn seeds
    and problems. One arm with sign 1 is an arm's score; two with signs (1, -1) a paired difference.

    The problem draws are those of ``bootstrap_ci`` with the same ``seed`` (the seed draws come from a generator of
    their own), so with one seed per arm, or seeds that agree on every problem, this is exactly the problem-only
    interval of the seed-averaged values; seeds that disagree widen it.
    """
    signs = [1.0] * len(arms) if signs is None else signs
    if not arms or len(signs) != len(arms):
        raise ValueError(f"expected one sign per arm, got {len(arms)} arms and {len(signs)} signs")
    data = [arm.detach().to("cpu", torch.float64) for arm in arms]
    if any(arm.dim() != 2 or arm.shape[0] == 0 or arm.shape[1] != data[0].shape[1] for arm in data):
        raise ValueError(
            f"expected (seeds, problems) tensors on the same problems, got {[tuple(a.shape) for a in data]}"
        )
    if data[0].shape[1] == 0:
        raise ValueError("expected at least one problem")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    num_problems = data[0].shape[1]
    problems_generator = torch.Generator().manual_seed(seed)  # the draws of bootstrap_ci
    seeds_generator = torch.Generator().manual_seed(seed + 1)
    block = max(1, _BLOCK_ENTRIES // num_problems)
    statistics = []
    for start in range(0, num_resamples, block):
        rows = min(block, num_resamples - start)
        problems = torch.randint(num_problems, (rows, num_problems), generator=problems_generator)
        total = torch.zeros(rows, dtype=torch.float64)
        for arm, sign in zip(data, signs):
            per_seed = arm[:, problems].mean(dim=-1).t()  # (rows, S): each seed's mean over the drawn problems
            drawn = torch.randint(arm.shape[0], (rows, arm.shape[0]), generator=seeds_generator)
            total += sign * per_seed.gather(1, drawn).mean(dim=1)
        statistics.append(total)
    tail = (1.0 - confidence) / 2.0
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    low, high = torch.quantile(torch.cat(statistics), quantiles).tolist()
    value = sum(sign * float(arm.mean()) for arm, sign in zip(data, signs))
    return value, low, high
