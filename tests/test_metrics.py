"""pass@k, entropy, answer diversity and bootstrap intervals against brute force and hand-made cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vlm_post.metrics import (
    AnswerDiversity,
    EvalMetrics,
    PassAtK,
    TokenEntropy,
    bootstrap_ci,
    paired_bootstrap_ci,
    pass_at_k,
    pass_at_k_per_problem,
    seed_problem_bootstrap_ci,
)

pytestmark = pytest.mark.fast


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every 3-subset has a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 5) == 1.0  # k = n: the only subset is all samples
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 does not fit a float; the product form needs no binomial.
    expected = 1.0 - math.comb(1990, 1000) / math.comb(2000, 1000)  # exact big-integer ratio
    assert pass_at_k(2000, 10, 1000) == pytest.approx(expected, rel=1e-12)


def test_per_problem_pass_at_k_matches_scalar_function():
    n = torch.tensor([1, 4, 8, 8, 16, 16, 16])
    c = torch.tensor([1, 0, 3, 8, 1, 15, 7])
    for k in (1, 2, 4):
        defined = n >= k
        got = pass_at_k_per_problem(n[defined], c[defined], k)
        expected = [pass_at_k(int(a), int(b), k) for a, b in zip(n[defined], c[defined])]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="fewer than k"):
        pass_at_k_per_problem(n, c, 2)


def test_pass_at_k_metric_is_mean_over_problems_from_either_input():
    torch.manual_seed(0)
    correct = torch.rand(12, 8) < 0.3
    from_matrix = PassAtK(ks=[1, 4, 8, 16])
    from_matrix.update(correct)
    result = from_matrix.compute()
    assert set(result) == {"pass@1", "pass@4", "pass@8"}  # 16 > n = 8 is not reported
    for k in (1, 4, 8):
        expected = sum(pass_at_k(8, int(row.sum()), k) for row in correct) / 12
        assert result[f"pass@{k}"].item() == pytest.approx(expected, rel=1e-6)
    assert result["pass@1"].item() == pytest.approx(correct.float().mean().item(), rel=1e-6)

    from_counts = PassAtK(ks=[1, 4, 8, 16])
    from_counts.update(num_samples=[8] * 12, num_correct=correct.sum(1))
    for key, value in result.items():
        torch.testing.assert_close(from_counts.compute()[key], value)


def test_pass_at_k_metric_reports_only_ks_every_problem_supports():
    metric = PassAtK(ks=[1, 4])
    metric.update(num_samples=torch.tensor([8, 2]), num_correct=torch.tensor([2, 1]))
    assert set(metric.compute()) == {"pass@1"}
    assert metric.compute()["pass@1"].item() == pytest.approx((2 / 8 + 1 / 2) / 2)
    with pytest.raises(ValueError):
        metric.update(torch.ones(2, 3, dtype=torch.bool), num_samples=[3, 3], num_correct=[1, 1])


def test_token_entropy_is_token_mean_over_masked_positions():
    entropies = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    metric = TokenEntropy()
    metric.update(entropies, mask)
    metric.update(torch.tensor([10.0]))
    assert metric.compute().item() == pytest.approx((1 + 2 + 4 + 10) / 4)  # per token, not per response


def test_token_entropy_of_nothing_is_nan():
    metric = TokenEntropy()
    metric.update(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert math.isnan(metric.compute().item())


def test_answer_diversity_on_hand_made_problems():
    metric = AnswerDiversity()
    metric.update([["3", "3", "3", "3"], ["3", "4", "3", "5"], ["2", None, None, "2"]])
    metric.update([[None, None]])
    result = metric.compute()
    # distinct: 1, 3, 2 ("2" and "no answer"), 1 ("no answer")
    assert result["mean_distinct_answers"].item() == pytest.approx(7 / 4)
    assert result["share_multiple_answers"].item() == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        metric.update([[]])
    with pytest.raises(TypeError):
        metric.update(["3", "4"])


def test_bootstrap_ci_is_deterministic_and_contains_the_estimate():
    generator = torch.Generator().manual_seed(1)
    values = (torch.rand(200, generator=generator) < 0.6).double()
    low, high = bootstrap_ci(values, num_resamples=500, seed=7)
    assert (low, high) == bootstrap_ci(values, num_resamples=500, seed=7)
    assert bootstrap_ci(values, num_resamples=500, seed=8) != (low, high)
    assert low < values.mean().item() < high
    assert 0.05 < high - low < 0.2  # about 2 * 1.96 * sqrt(0.6 * 0.4 / 200) = 0.136


def test_bootstrap_ci_narrows_with_more_problems():
    generator = torch.Generator().manual_seed(2)
    few = (torch.rand(50, generator=generator) < 0.5).double()
    many = (torch.rand(5000, generator=generator) < 0.5).double()
    few_low, few_high = bootstrap_ci(few)
    many_low, many_high = bootstrap_ci(many)
    assert many_high - many_low < (few_high - few_low) / 5  # width ~ 1/sqrt(P): ratio 10


def test_bootstrap_ci_of_equal_values_has_zero_width():
    low, high = bootstrap_ci(torch.full((30,), 0.25))
    assert low == high == pytest.approx(0.25)


def test_bootstrap_ci_for_pass_at_k_uses_per_problem_values():
    n = torch.full((40,), 8)
    c = torch.arange(40) % 5
    per_problem = pass_at_k_per_problem(n, c, 4)
    low, high = bootstrap_ci(per_problem, confidence=0.9)
    assert low < per_problem.mean().item() < high
    with pytest.raises(ValueError):
        bootstrap_ci(per_problem, confidence=1.0)


def _merged(make, updates):
    """Result of one metric fed everything, and of two 'ranks' fed halves and merged like a DDP sync."""
    single, rank0, rank1 = make(), make(), make()
    for index, update in enumerate(updates):
        update(single)
        update(rank0 if index % 2 == 0 else rank1)
    rank0.merge_state(rank1)  # reduces each state with its dist_reduce_fx, as the all-gather sync does
    return single.compute(), rank0.compute()


def test_metrics_merged_across_ranks_equal_single_process():
    torch.manual_seed(3)
    correct = [torch.rand(5, 8) < 0.4 for _ in range(4)]
    single, merged = _merged(lambda: PassAtK(ks=[1, 2, 8]), [lambda m, x=x: m.update(x) for x in correct])
    assert single.keys() == merged.keys() == {"pass@1", "pass@2", "pass@8"}
    for key in single:
        torch.testing.assert_close(merged[key], single[key])

    entropies = [(torch.rand(3, 7), torch.rand(3, 7) < 0.7) for _ in range(4)]
    single, merged = _merged(TokenEntropy, [lambda m, e=e, k=k: m.update(e, k) for e, k in entropies])
    torch.testing.assert_close(merged, single)

    groups = [[["1", "2"], ["1", "1"]], [["x", None]], [["a", "b", "c"]], [["7", "7"], [None, None]]]
    single, merged = _merged(AnswerDiversity, [lambda m, g=g: m.update(g) for g in groups])
    assert merged == single
    assert single["mean_distinct_answers"].item() == pytest.approx((2 + 1 + 2 + 3 + 1 + 1) / 6)


def test_existing_eval_metrics_export_is_intact():
    from vlm_post.metrics import evaluation

    assert EvalMetrics is evaluation.EvalMetrics


def test_the_seed_problem_bootstrap_with_one_seed_is_the_problem_bootstrap():

    torch.manual_seed(0)
    a, b = torch.rand(40), torch.rand(40)
    value, low, high = seed_problem_bootstrap_ci([a[None]], num_resamples=500, seed=3)
    assert (low, high) == bootstrap_ci(a, 500, seed=3) and value == pytest.approx(float(a.mean()))
    assert seed_problem_bootstrap_ci([a[None], b[None]], [1.0, -1.0], 500, seed=3) == pytest.approx(
        paired_bootstrap_ci(a, b, 500, seed=3), abs=1e-12
    )


def test_seeds_that_agree_add_nothing_and_seeds_that_differ_widen_the_interval():
    """Three seeds of one arm: the same per-problem values, or the same shifted by a constant per seed."""

    torch.manual_seed(0)
    problems = (torch.rand(60) < 0.6).double()
    agree = problems.repeat(3, 1)
    _, *problem_only = paired_bootstrap_ci(agree.mean(0), torch.zeros(60), 2000, seed=1)
    assert seed_problem_bootstrap_ci([agree], num_resamples=2000, seed=1)[1:] == pytest.approx(problem_only, abs=1e-12)
    shifted = problems + torch.tensor([-0.1, 0.0, 0.1], dtype=torch.float64)[:, None]  # the seed effect: +-0.1
    value, low, high = seed_problem_bootstrap_ci([shifted], num_resamples=2000, seed=1)
    _, *problems_low_high = paired_bootstrap_ci(shifted.mean(0), torch.zeros(60), 2000, seed=1)
    assert value == pytest.approx(float(problems.mean()))
    assert high - low > 1.15 * (problems_low_high[1] - problems_low_high[0])  # the seeds' spread is in it
    # a paired difference of two arms whose seeds shift: wider than problems alone, the same with one seed each
    other = (torch.rand(60) < 0.4).double() + torch.tensor([0.05, -0.05, 0.0], dtype=torch.float64)[:, None]
    _, d_low, d_high = seed_problem_bootstrap_ci([shifted, other], [1.0, -1.0], 2000, seed=1)
    _, p_low, p_high = paired_bootstrap_ci(shifted.mean(0), other.mean(0), 2000, seed=1)
    assert d_high - d_low > p_high - p_low
    with pytest.raises(ValueError, match="same problems"):
        seed_problem_bootstrap_ci([shifted, other[:, :10]], [1.0, -1.0])
