"""Bootstrap confidence intervals for per-problem statistics (accuracy, pass@k), over problems and over seeds.

Problems are the unit of resampling: samples of one problem are correlated, so
resampling samples would understate the uncertainty of a benchmark score. When a
recipe was trained with several seeds, the seeds are a second unit: a seed that
shifts every problem together is variation of the recipe that a problem-only
bootstrap of the seed-averaged values never sees (``seed_problem_bootstrap_ci``).
"""

from __future__ import annotations

import functools

import torch

# Resamples are drawn in blocks of at most this many entries (their index and count matrices: 64 MiB each).
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
    means = [counts @ data / data.numel() for counts in _problem_draws(data.numel(), num_resamples, seed)]
    return _percentiles(torch.cat(means), confidence)


def _problem_draws(num_problems: int, num_resamples: int, seed: int):
    """Blocks of resamples of P problems with replacement, as (rows, P) counts: how often each problem was drawn.

    A resample's mean is then ``counts @ values / P``, one matrix product for every resample of a block (and every
    seed of an arm at once). Every bootstrap here draws through this, so one ``seed`` gives one set of draws; a
    study report takes hundreds of intervals over the same problems and seed, so draws that fit in one block are
    made once and kept (the matrix product is then most of an interval's cost).
    """
    if num_problems * num_resamples <= _BLOCK_ENTRIES:
        return _kept_draws(num_problems, num_resamples, seed)
    return _draws(num_problems, num_resamples, seed)


@functools.lru_cache(maxsize=4)  # at most 4 x 64 MiB
def _kept_draws(num_problems: int, num_resamples: int, seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(_draws(num_problems, num_resamples, seed))


def _draws(num_problems: int, num_resamples: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    block = max(1, _BLOCK_ENTRIES // num_problems)
    for start in range(0, num_resamples, block):
        rows = min(block, num_resamples - start)
        indices = torch.randint(num_problems, (rows, num_problems), generator=generator)
        counts = torch.zeros(rows, num_problems, dtype=torch.float64)
        yield counts.scatter_add_(1, indices, torch.ones(rows, num_problems, dtype=torch.float64))


def _percentiles(statistics: torch.Tensor, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(statistics, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
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
    seeds_generator = torch.Generator().manual_seed(seed + 1)  # the problem draws are bootstrap_ci's, of ``seed``
    statistics = []
    for counts in _problem_draws(num_problems, num_resamples, seed):
        total = torch.zeros(counts.shape[0], dtype=torch.float64)
        for arm, sign in zip(data, signs):
            per_seed = counts @ arm.t() / num_problems  # (rows, S): each seed's mean over the drawn problems
            drawn = torch.randint(arm.shape[0], (counts.shape[0], arm.shape[0]), generator=seeds_generator)
            total += sign * per_seed.gather(1, drawn).mean(dim=1)
        statistics.append(total)
    low, high = _percentiles(torch.cat(statistics), confidence)
    value = sum(sign * float(arm.mean()) for arm, sign in zip(data, signs))
    return value, low, high
