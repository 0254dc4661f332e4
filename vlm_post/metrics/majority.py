"""maj@k: is the majority answer of k samples right? Per problem, and as a synced metric (verl's ``maj@N``).

A problem's n samples each have a normalised extracted answer (None: none could be extracted) and a grade. For a
set of k samples, the vote goes to the answer given most often among them; a sample without an answer does not
vote, and a set with no answer at all scores 0. A tie for the most votes is broken uniformly at random, in
expectation: the set scores the share of right answers among the tied ones (1/2 for a right and a wrong answer
tied). So the score is a deterministic function of the samples, whatever their order.

The estimator is the mean score over the k-subsets of the n samples, the way pass@k averages over them: over all
C(n, k) subsets when there are at most ``MAX_SUBSETS`` (every k for n <= 16), otherwise over ``MAX_SUBSETS``
subsets drawn uniformly (a seeded generator: the same samples give the same estimate). maj@n is the vote of all n.
An answer counts as right when any of its samples was graded right (grading reads the extracted answer, so samples
with the same normalised answer have the same grade unless the normaliser merged two answers that grade apart).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torchmetrics import Metric

MAX_SUBSETS = 20_000


@lru_cache(maxsize=64)
def _all_subsets(n: int, k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long).view(-1, k)


def _subsets(n: int, k: int, seed: int) -> torch.Tensor:
    """(S, k) sample indices: every k-subset of n, or MAX_SUBSETS drawn uniformly without replacement within each."""
    if math.comb(n, k) <= MAX_SUBSETS:
        return _all_subsets(n, k)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(MAX_SUBSETS, n, generator=generator).argsort(dim=1)[:, :k]


def majority_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int, seed: int = 0) -> float:
    """maj@k of one problem from its n samples' normalised answers and grades."""
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"expected one grade per answer, got {n} answers and {len(correct)} grades")
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} is undefined with n={n} samples per problem: draw at least k samples (k <= n)")
    distinct = sorted({a for a in answers if a is not None})
    if not distinct:
        return 0.0
    index = {answer: i for i, answer in enumerate(distinct)}
    none = len(distinct)  # the column of samples without an answer: they never vote
    ids = torch.tensor([index[a] if a is not None else none for a in answers])
    right = torch.zeros(none + 1, dtype=torch.bool)
    for answer, ok in zip(answers, correct):
        if answer is not None and ok:
            right[index[answer]] = True
    chosen = ids[_subsets(n, k, seed)]  # (S, k)
    votes = torch.zeros(chosen.shape[0], none + 1).scatter_add_(1, chosen, torch.ones(chosen.shape))
    votes[:, none] = 0
    most = votes.max(dim=1, keepdim=True).values
    winners = (votes == most) & (most > 0)
    score = (winners & right).sum(1) / winners.sum(1).clamp(min=1)
    return float(score.double().mean())


def majority_at_k_per_problem(
    answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]], k: int, seed: int = 0
) -> torch.Tensor:
    """(P,) float64: ``majority_at_k`` of each problem."""
    return torch.tensor([majority_at_k(a, c, k, seed) for a, c in zip(answers, correct)], dtype=torch.float64)


class MajorityAtK(Metric):
    """Mean maj@k over problems for each k in ``ks``; states sum across ranks. ``update`` takes one list of
    normalised answers and one of grades per problem (a problem must not be split across updates or ranks).
    ``compute`` returns ``{"maj@k": value}`` for each k every problem seen had the samples for."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1,), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = sorted({int(k) for k in ks})
        self.add_state("score_sum", torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("defined_count", torch.zeros(len(self.ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_problems", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str | None]], correct: torch.Tensor | Sequence[Sequence[bool]]) -> None:
        correct = [[bool(ok) for ok in row] for row in correct]
        self.num_problems += len(answers)
        for index, k in enumerate(self.ks):
            defined = [(a, c) for a, c in zip(answers, correct) if len(a) >= k]
            self.defined_count[index] += len(defined)
            self.score_sum[index] += sum(majority_at_k(a, c, k) for a, c in defined)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            f"maj@{k}": (self.score_sum[index] / self.num_problems).float()
            for index, k in enumerate(self.ks)
            if self.num_problems > 0 and self.defined_count[index] == self.num_problems
        }
