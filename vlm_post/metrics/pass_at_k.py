"""pass@k with the unbiased estimator of Chen et al. (2021), per problem and as a synced metric.

For a problem with n samples of which c are correct, the probability that a
random k-subset of the n samples holds at least one correct one is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i),

and pass@k = 1 when n - c < k. The product form never builds a binomial
coefficient, so it stays exact to float64 rounding for any n. The reported
pass@k is the mean over problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric


def _check_counts(n: int, c: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n correct samples, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with n={n} samples per problem: draw at least k samples (k <= n)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct.

    Raises ValueError when k > n (no k-subset exists), k < 1, or c is outside [0, n].
    """
    n, c, k = int(n), int(c), int(k)
    _check_counts(n, c, k)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_per_problem(num_samples: torch.Tensor, num_correct: torch.Tensor, k: int) -> torch.Tensor:
    """pass@k of each problem, (P,) float64, from per-problem sample and correct counts (P,).

    Vectorised product form: row p multiplies (1 - k/i) over its c_p factors
    i = n_p - c_p + 1 .. n_p. Raises ValueError when any problem has fewer than k samples.
    """
    n = torch.as_tensor(num_samples).long().reshape(-1)
    c = torch.as_tensor(num_correct, device=n.device).long().reshape(-1)
    if n.shape != c.shape:
        raise ValueError(f"num_samples and num_correct must have the same length, got {n.numel()} and {c.numel()}")
    if n.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=n.device)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if bool(((c < 0) | (c > n)).any()):
        raise ValueError("pass@k needs 0 <= c <= n correct samples for every problem")
    if bool((n < k).any()):
        raise ValueError(
            f"pass@{k} is undefined for problems with fewer than k samples (min n = {int(n.min())}): "
            "draw at least k samples per problem"
        )
    offsets = torch.arange(int(c.max()) + 1, device=n.device)
    denominators = (n - c + 1).unsqueeze(1) + offsets  # i = n-c+1, n-c+2, ...
    in_product = offsets < c.unsqueeze(1)
    factors = torch.where(in_product, 1.0 - k / denominators.double(), torch.ones((), dtype=torch.float64))
    return torch.where(n - c < k, torch.ones((), dtype=torch.float64), 1.0 - factors.prod(dim=1))


def _counts_from_correctness(correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if correct.dim() != 2:
        raise ValueError(f"expected a (problems, samples) correctness tensor, got shape {tuple(correct.shape)}")
    n = torch.full((correct.shape[0],), correct.shape[1], dtype=torch.long, device=correct.device)
    return n, correct.bool().sum(dim=1)


class PassAtK(Metric):
    """Mean unbiased pass@k over problems, for each k in ``ks``; states sum across ranks.

    ``update`` takes either a (P, n) boolean correctness tensor (problem x
    sample) or per-problem counts ``num_samples=(P,)``, ``num_correct=(P,)``
    (n may differ between problems). ``compute`` returns ``{"pass@k": value}``
    for each k that every problem seen has enough samples for (k <= n); a k
    larger than some problem's n is left out rather than averaged over a
    different subset of problems.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1,), **kwargs) -> None:
        super().__init__(**kwargs)
        ks = sorted({int(k) for k in ks})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
        self.ks = ks
        self.add_state("pass_sum", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("defined_count", torch.zeros(len(ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_problems", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        correct: torch.Tensor | None = None,
        *,
        num_samples: torch.Tensor | Sequence[int] | None = None,
        num_correct: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        if (correct is None) == (num_samples is None or num_correct is None):
            raise ValueError("pass PassAtK.update either a (P, n) correctness tensor or num_samples and num_correct")
        if correct is not None:
            n, c = _counts_from_correctness(torch.as_tensor(correct))
        else:
            n, c = torch.as_tensor(num_samples).long().reshape(-1), torch.as_tensor(num_correct).long().reshape(-1)
        n, c = n.to(self.pass_sum.device), c.to(self.pass_sum.device)
        self.num_problems += n.numel()
        for index, k in enumerate(self.ks):
            defined = n >= k
            self.defined_count[index] += defined.sum()
            if bool(defined.any()):
                self.pass_sum[index] += pass_at_k_per_problem(n[defined], c[defined], k).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        reported = {}
        for index, k in enumerate(self.ks):
            if self.num_problems > 0 and self.defined_count[index] == self.num_problems:
                reported[f"pass@{k}"] = (self.pass_sum[index] / self.num_problems).float()
        return reported
