"""How many different final answers the policy gives to the same problem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def distinct_answer_count(answers: Sequence[str | None]) -> int:
    """Distinct answers among one problem's samples; None ("no answer") is one category of its own."""
    return len(set(answers))


class AnswerDiversity(Metric):
    """Mean number of distinct final answers per problem, and the share of problems with two or more.

    ``update`` takes one list per problem holding all of that problem's n
    sampled answers, already normalised by the caller (so "1/2" and "0.5" are
    one answer only if the normaliser made them so). An unextractable answer is
    passed as None and counts as one more category, "no answer": a problem
    answered "3" four times and unanswered four times has two distinct
    outcomes, which is what matters for group-relative rewards. A problem's
    answers are counted when it is updated, so the states are three integer
    sums that sync across ranks exactly; a problem must not be split across
    updates or ranks.

    ``compute`` returns ``{"mean_distinct_answers": ..., "share_multiple_answers": ...}``
    (NaN when no problem was seen).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("distinct_sum", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("multiple_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_problems", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str | None]]) -> None:
        if isinstance(answers, str) or any(isinstance(group, str) for group in answers):
            raise TypeError("AnswerDiversity.update takes a list per problem of that problem's answers")
        counts = [distinct_answer_count(group) for group in answers]
        if any(count == 0 for count in counts):
            raise ValueError("every problem needs at least one sampled answer")
        self.distinct_sum += sum(counts)
        self.multiple_count += sum(count >= 2 for count in counts)
        self.num_problems += len(counts)

    def compute(self) -> dict[str, torch.Tensor]:
        problems = self.num_problems.double()
        return {
            "mean_distinct_answers": (self.distinct_sum / problems).float(),
            "share_multiple_answers": (self.multiple_count / problems).float(),
        }
