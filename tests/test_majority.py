"""maj@k (vlm_post/metrics/majority.py) against values counted by hand over every subset."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_post.metrics import MajorityAtK, majority_at_k, majority_at_k_per_problem

pytestmark = pytest.mark.fast

# Four samples: "3" twice (right), "5" (wrong), one without an answer.
ANSWERS, CORRECT = ["3", "3", "5", None], [True, True, False, False]


def test_majority_by_hand_over_every_subset():
    # k=1: each sample alone: 2 of 4 are right
    assert majority_at_k(ANSWERS, CORRECT, 1) == pytest.approx(0.5)
    # k=2, six pairs: {3,3} 1, {3,5} tie 1/2 (twice), {3,-} 1 (twice), {5,-} 0 -> (1 + 0.5 + 0.5 + 1 + 1 + 0) / 6
    assert majority_at_k(ANSWERS, CORRECT, 2) == pytest.approx(4 / 6)
    # k=3: {3,3,5} 1, {3,3,-} 1, {3,5,-} tie 1/2 (twice) -> 3 / 4
    assert majority_at_k(ANSWERS, CORRECT, 3) == pytest.approx(3 / 4)
    # k=4: "3" has two votes against one
    assert majority_at_k(ANSWERS, CORRECT, 4) == 1.0


def test_no_answer_never_wins_and_a_problem_without_answers_scores_zero():
    assert majority_at_k([None, None, "7"], [False, False, True], 3) == 1.0  # one vote beats two non-votes
    assert majority_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ValueError, match="maj@3 is undefined with n=2"):
        majority_at_k(["1", "2"], [True, False], 3)


def test_the_order_of_the_samples_does_not_matter():
    answers, correct = ["a", "b", "b", "c", "a", "b"], [True, False, False, False, True, False]
    values = [majority_at_k(answers, correct, k) for k in range(1, 7)]
    order = [5, 2, 0, 4, 1, 3]
    assert values == [majority_at_k([answers[i] for i in order], [correct[i] for i in order], k) for k in range(1, 7)]


def test_maj_at_1_is_the_mean_accuracy():
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(5, 8, generator=generator) < 0.4
    answers = [["right" if ok else f"wrong{j % 3}" for j, ok in enumerate(row)] for row in correct.tolist()]
    per_problem = majority_at_k_per_problem(answers, correct.tolist(), 1)
    torch.testing.assert_close(per_problem, correct.double().mean(1))


def test_many_samples_are_estimated_from_random_subsets_close_to_the_exact_value():
    # 30 right and 10 wrong answers, k = 20 (C(40, 20) subsets: sampled): the vote is right when the subset holds
    # more than 10 right ones, and half right at exactly 10: a hypergeometric sum
    answers, correct = ["1"] * 30 + ["2"] * 10, [True] * 30 + [False] * 10
    exact = sum(math.comb(30, j) * math.comb(10, 20 - j) for j in range(11, 21)) / math.comb(40, 20)
    exact += 0.5 * math.comb(30, 10) * math.comb(10, 10) / math.comb(40, 20)
    estimate = majority_at_k(answers, correct, 20)
    assert estimate == pytest.approx(exact, abs=0.005) and estimate == majority_at_k(answers, correct, 20)


def test_the_metric_is_the_mean_over_problems_for_each_k():
    metric = MajorityAtK([1, 2, 4])
    metric.update([ANSWERS, ["x", "x", "y", "y"]], [CORRECT, [False, False, True, True]])
    result = metric.compute()
    assert set(result) == {"maj@1", "maj@2", "maj@4"}
    # problem 2, k=4: "x" and "y" tie: 1/2
    assert result["maj@4"].item() == pytest.approx((1.0 + 0.5) / 2)
    assert result["maj@2"].item() == pytest.approx((4 / 6 + majority_at_k(["x", "x", "y", "y"], [0, 0, 1, 1], 2)) / 2)
