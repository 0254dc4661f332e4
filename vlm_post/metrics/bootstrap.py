"""Problem-level bootstrap confidence intervals for per-problem statistics (accuracy, pass@k).

Problems are the unit of resampling: samples of one problem are correlated, so
resampling samples would understate the uncertainty of a benchmark score.
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
