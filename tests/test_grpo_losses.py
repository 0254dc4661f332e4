"""GRPO advantages, KL estimators, PPO-clip loss and aggregations against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_post.errors import ConfigError
from vlm_post.losses import (
    GRPOLossConfig,
    aggregate,
    group_advantages,
    groups_with_signal,
    grpo_loss,
    kl_penalty,
    kl_reward_penalty,
    overlong_penalty,
    policy_loss,
    token_kl,
)
from vlm_post.losses.kl import KL_KINDS

pytestmark = pytest.mark.fast

S3 = math.sqrt(3.0)


# ---------------------------------------------------------------- advantages


def test_grpo_advantages_use_group_mean_and_unbiased_std():
    # group 0: [1, 0, 0], mean 1/3, unbiased std sqrt(1/3); group 1: [0, 2, 4], mean 2, unbiased std 2
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    advantages = group_advantages(rewards, group_size=3)
    expected = torch.tensor([2 / S3, -1 / S3, -1 / S3, -1.0, 0.0, 1.0])
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-5)


def test_dr_grpo_advantages_only_subtract_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    advantages = group_advantages(rewards, group_size=3, normalize_std=False)
    torch.testing.assert_close(advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0]))


def test_constant_group_gets_zero_advantages_and_is_flagged_without_signal():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    for normalize_std in (True, False):
        advantages = group_advantages(rewards, group_size=3, normalize_std=normalize_std)
        assert torch.equal(advantages[:3], torch.zeros(3)) and torch.equal(advantages[6:], torch.zeros(3))
        assert advantages[3:6].abs().min() > 0
    assert groups_with_signal(rewards, group_size=3).tolist() == [False, True, False]


def test_advantages_reject_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), group_size=1)


# ---------------------------------------------------------------- KL estimators


def _categorical_pair():
    pi = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.10, 0.15, 0.20, 0.25, 0.15, 0.15], dtype=torch.float64)
    return pi, ref


def _samples_from(pi, ref, num_samples=200_000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.multinomial(pi, num_samples, replacement=True, generator=generator)
    return pi.log()[x], ref.log()[x]


def _assert_mean_within_standard_errors(samples, expected, num_se=4.0):
    standard_error = samples.std() / math.sqrt(samples.numel())
    assert abs(samples.mean() - expected) < num_se * standard_error, (samples.mean(), expected, standard_error)


def test_k1_and_k3_are_unbiased_for_kl_under_samples_from_pi():
    pi, ref = _categorical_pair()
    exact_kl = float((pi * (pi / ref).log()).sum())  # about 0.30 nats
    logprob, ref_logprob = _samples_from(pi, ref)
    k1 = kl_penalty(logprob, ref_logprob, "k1")
    k3 = kl_penalty(logprob, ref_logprob, "k3_unclamped")
    # |d| <= log 3 on every outcome, far inside the clamps: the clamped k3 is the same estimator here
    assert torch.equal(kl_penalty(logprob, ref_logprob, "k3"), k3)
    _assert_mean_within_standard_errors(k1, exact_kl)
    _assert_mean_within_standard_errors(k3, exact_kl)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert k3.var() < k1.var()  # the point of k3


def test_k2_expectation_is_within_the_third_order_bound_of_kl():
    pi, ref = _categorical_pair()
    exact_kl = float((pi * (pi / ref).log()).sum())
    d = (ref / pi).log()  # log ref - log pi, per outcome
    exact_k2 = float((pi * 0.5 * d.square()).sum())
    # k3 - k2 = e^xi d^3 / 6 with xi between 0 and d, and E[k3] = KL
    bound = float((pi * d.abs().pow(3) * d.clamp(min=0).exp()).sum() / 6)
    assert abs(exact_k2 - exact_kl) <= bound
    assert exact_k2 != pytest.approx(exact_kl, abs=1e-3)  # biased: not a vacuous check
    logprob, ref_logprob = _samples_from(pi, ref)
    _assert_mean_within_standard_errors(kl_penalty(logprob, ref_logprob, "k2"), exact_k2)


def test_low_var_kl_is_k3_unclamped_clamped_with_finite_gradients():
    logprob = torch.tensor([-1.0, -2.0, -0.5, -3.0, -101.0, -1.0, 0.0], requires_grad=True)
    ref_logprob = torch.tensor([-1.2, -0.5, -2.5, -3.0, -1.0, -120.0, -100.0])
    low_var = kl_penalty(logprob, ref_logprob, "low_var_kl")
    unclamped = kl_penalty(logprob, ref_logprob, "k3_unclamped")
    torch.testing.assert_close(low_var[:4], unclamped[:4])  # |d| <= 2: below 10, inside the clamp
    assert torch.equal(low_var[4:], torch.full((3,), 10.0))  # d = 100, -119, -100: clamped
    assert torch.isinf(unclamped[4])  # the unclamped k3 overflows where low_var_kl does not
    (grad,) = torch.autograd.grad(low_var.sum(), logprob)
    assert torch.isfinite(grad).all() and torch.equal(grad[4:], torch.zeros(3))


def test_each_estimator_at_log_ratios_minus_5_0_and_5_by_hand():
    """d = log ref - log pi; k3 is verl's clamped low_var_kl (10.0 at d = 5, where it was 142.4 before)."""
    logprob = torch.tensor([-1.0, -1.0, -6.0], dtype=torch.float64)
    ref_logprob = torch.tensor([-6.0, -1.0, -1.0], dtype=torch.float64)  # d = -5, 0, 5
    e = math.e
    by_hand = {
        "k1": [5.0, 0.0, -5.0],  # -d
        "k2": [12.5, 0.0, 12.5],  # d^2 / 2
        "k3_unclamped": [e**-5 - 1 + 5, 0.0, e**5 - 1 - 5],  # 4.0067, 0, 142.4132
        "k3": [e**-5 - 1 + 5, 0.0, 10.0],  # clamped at 10 nats
    }
    by_hand.update(kl=by_hand["k1"], mse=by_hand["k2"], low_var_kl=by_hand["k3"])
    assert set(by_hand) == set(KL_KINDS)
    for kind, expected in by_hand.items():
        values = kl_penalty(logprob, ref_logprob, kind)
        torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert kl_penalty(logprob, ref_logprob, "k3_unclamped")[2].item() == pytest.approx(142.4132, abs=1e-4)
    for kind in KL_KINDS:
        assert GRPOLossConfig(kl_kind=kind).kl_kind == kind  # every name is a valid config value


def test_k3_has_no_gradient_where_it_is_clamped():
    logprob = torch.tensor([-6.0, -1.0, -0.3, -1.0], requires_grad=True)
    ref_logprob = torch.tensor([-1.0, -1.2, -0.5, -30.0])  # d = 5, -0.2, -0.2, -29
    (grad,) = torch.autograd.grad(kl_penalty(logprob, ref_logprob, "k3").sum(), logprob)
    (grad_unclamped,) = torch.autograd.grad(kl_penalty(logprob, ref_logprob, "k3_unclamped").sum(), logprob)
    assert grad[0] == grad[3] == 0 and grad_unclamped[0] != 0
    torch.testing.assert_close(grad[1:3], grad_unclamped[1:3])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("k1", "zero"), ("k2", "reverse_kl"), ("k3_unclamped", "forward_kl")],
)
def test_expected_gradient_of_each_estimator_as_a_loss(kind, expected):
    """The gradient claims of the kl module docstring, as exact expectations over a categorical."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    # E_{x~pi}[k(x)] with the sampling distribution held fixed, as when the samples are given
    expected_estimator = (logp.exp().detach() * kl_penalty(logp, ref_logp, kind)).sum()
    (grad,) = torch.autograd.grad(expected_estimator, theta, retain_graph=True)
    if expected == "zero":
        torch.testing.assert_close(grad, torch.zeros(6, dtype=torch.float64))
        return
    p, q = logp.exp(), ref_logp.exp()
    divergence = (p * (logp - ref_logp)).sum() if expected == "reverse_kl" else (q * (ref_logp - logp)).sum()
    (want,) = torch.autograd.grad(divergence, theta)
    torch.testing.assert_close(grad, want)


def test_unknown_kl_kind_is_rejected():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")  # type: ignore[arg-type]


# ---------------------------------------------------------------- PPO-clip policy loss


def _ppo(clip_low=0.2, clip_high=0.2, dual_clip=None, aggregation="token-mean", max_response_length=None):
    """The PPO loss's settings (policy_loss's defaults before the registry: symmetric clip, no dual clip)."""
    return GRPOLossConfig(
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        aggregation=aggregation,
        max_response_length=max_response_length,
        kl_mode="off",
    )


def _logprobs_for_ratios(ratios):
    old = torch.full((len(ratios),), -1.0)
    logprobs = (old + torch.tensor(ratios).log()).requires_grad_()
    return logprobs[None], old[None]


def test_policy_loss_is_minus_advantage_times_ratio_when_nothing_is_clipped():
    torch.manual_seed(0)
    old = torch.randn(3, 5) - 2
    logprobs = (old + torch.empty(3, 5).uniform_(-0.15, 0.15)).requires_grad_()  # ratio within [0.86, 1.17]
    advantages = torch.tensor([1.5, -0.7, 0.3])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, _ppo(0.2, 0.2, 3.0))
    ratio = (logprobs - old).exp()
    expected = (-advantages[:, None] * ratio)[mask.bool()].mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clip_fraction"] == 0 and stats["dual_clip_fraction"] == 0
    torch.testing.assert_close(stats["ratio_mean"], ratio[mask.bool()].mean().detach())
    torch.testing.assert_close(stats["ratio_min"], ratio[mask.bool()].min().detach())
    torch.testing.assert_close(stats["ratio_max"], ratio[mask.bool()].max().detach())
    log_ratio = (logprobs - old)[mask.bool()].detach()
    torch.testing.assert_close(stats["approx_kl"], (log_ratio.exp() - 1 - log_ratio).mean())


# One row, per-token advantages, clip_low 0.2 / clip_high 0.3 (so the ratio is clipped to [0.8, 1.3]):
#   A   ratio  -A*ratio  -A*clip(ratio)  loss   clip active
#  +1   1.1     -1.1       -1.1          -1.1   no
#  +1   1.5     -1.5       -1.3          -1.3   yes (above 1 + clip_high)
#  +1   0.5     -0.5       -0.8          -0.5   no  (a worse ratio is never clipped)
#  -2   0.5      1.0        1.6           1.6   yes (below 1 - clip_low)
#  -2   1.5      3.0        2.6           3.0   no
#  -2   4.0      8.0        2.6           8.0   no; with dual clip 3: capped at 3 * 2 = 6
#  +1   1.5     (masked out: neither counted nor averaged)
CLIP_RATIOS = [1.1, 1.5, 0.5, 0.5, 1.5, 4.0, 1.5]
CLIP_ADVANTAGES = torch.tensor([[1.0, 1.0, 1.0, -2.0, -2.0, -2.0, 1.0]])
CLIP_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
CLIP_LOSSES = [-1.1, -1.3, -0.5, 1.6, 3.0, 8.0]


def test_clipped_cases_for_positive_and_negative_advantages_with_asymmetric_clips():
    logprobs, old = _logprobs_for_ratios(CLIP_RATIOS)
    loss, stats = policy_loss(logprobs, old, CLIP_ADVANTAGES, CLIP_MASK, _ppo(0.2, 0.3))
    torch.testing.assert_close(loss, torch.tensor(sum(CLIP_LOSSES) / 6))
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(2 / 6))
    assert stats["dual_clip_fraction"] == 0
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(4.0))


def test_dual_clip_caps_the_loss_of_negative_advantages():
    logprobs, old = _logprobs_for_ratios(CLIP_RATIOS)
    loss, stats = policy_loss(logprobs, old, CLIP_ADVANTAGES, CLIP_MASK, _ppo(0.2, 0.3, 3.0))
    capped = CLIP_LOSSES[:5] + [6.0]
    torch.testing.assert_close(loss, torch.tensor(sum(capped) / 6))
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(2 / 6))
    torch.testing.assert_close(stats["dual_clip_fraction"], torch.tensor(1 / 6))
    with pytest.raises(ConfigError, match="dual_clip"):
        _ppo(dual_clip=1.0)


def test_clipped_and_masked_tokens_get_no_gradient():
    logprobs, old = _logprobs_for_ratios(CLIP_RATIOS)
    loss, _ = policy_loss(logprobs, old, CLIP_ADVANTAGES, CLIP_MASK, _ppo(0.2, 0.3, 3.0))
    (grad,) = torch.autograd.grad(loss, logprobs)
    ratios, advantages = torch.tensor(CLIP_RATIOS), CLIP_ADVANTAGES[0]
    # d(-A * exp(logp - old)) / dlogp = -A * ratio, over 6 valid tokens
    unclipped = -advantages * ratios / 6
    expected = torch.where(torch.tensor([True, False, True, False, True, False, False]), unclipped, 0.0)
    torch.testing.assert_close(grad[0], expected)


def test_gradient_at_ratio_one_is_minus_advantage_over_token_count():
    torch.manual_seed(0)
    logprobs = (torch.randn(3, 4) - 2).requires_grad_()
    advantages = torch.tensor([0.8, -1.2, 0.4])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    # on-policy: old log-probs are the current ones (passed undetached: policy_loss detaches them)
    loss, stats = policy_loss(logprobs, logprobs, advantages, mask, _ppo(0.2, 0.3, 3.0))
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = -advantages[:, None].expand(3, 4) / 7 * mask
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, -(advantages * mask.sum(-1)).sum() / 7)
    assert stats["approx_kl"] == 0 and stats["ratio_min"] == stats["ratio_max"] == 1


# ---------------------------------------------------------------- aggregation

RAGGED_VALUES = [[1.0, 2.0, 3.0, 4.0], [10.0, float("nan"), float("inf"), 0.0]]  # padding may hold anything
RAGGED_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected", "long_token_weight", "short_token_weight"),
    [
        ("token-mean", (10 + 10) / 5, 1 / 5, 1 / 5),  # every token alike: the long row holds 4/5 of the weight
        ("seq-mean-token-mean", (10 / 4 + 10 / 1) / 2, 1 / 8, 1 / 2),  # every row alike
        ("seq-mean-token-sum-norm", (10 / 8 + 10 / 8) / 2, 1 / 16, 1 / 16),  # constant divisor 8
    ],
)
def test_aggregations_on_a_ragged_mask(mode, expected, long_token_weight, short_token_weight):
    values = torch.tensor(RAGGED_VALUES, requires_grad=True)
    result = aggregate(values, RAGGED_MASK, mode, max_response_length=8)
    torch.testing.assert_close(result, torch.tensor(expected))
    (grad,) = torch.autograd.grad(result, values)
    weights = [[long_token_weight] * 4, [short_token_weight, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(weights))


def test_aggregation_skips_padding_rows_and_needs_max_length_for_sum_norm():
    values = torch.tensor([[1.0, 3.0], [5.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    assert aggregate(values, mask, "seq-mean-token-mean") == 2.0
    assert aggregate(values, mask, "seq-mean-token-sum-norm", max_response_length=4) == 1.0
    empty = aggregate(values, torch.zeros(2, 2), "token-mean")
    assert empty == 0 and empty.requires_grad
    with pytest.raises(ValueError):
        aggregate(values, mask, "seq-mean-token-sum-norm")


# ---------------------------------------------------------------- composition and KL modes


def _rollout(seed=0):
    torch.manual_seed(seed)
    old = torch.randn(4, 5) - 2
    logprobs = (old + 0.3 * torch.randn(4, 5)).requires_grad_()
    ref = old + 0.5 * torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    return logprobs, old, ref, mask, advantages


def test_grpo_loss_adds_kl_in_loss_mode_and_subtracts_the_entropy_bonus():
    logprobs, old, ref, mask, advantages = _rollout()
    entropy = torch.rand(4, 5)
    config = GRPOLossConfig(kl_mode="loss", kl_coef=0.1, entropy_coef=0.01, aggregation="seq-mean-token-mean")
    loss, stats = grpo_loss(logprobs, old, advantages, mask, config, ref_logprobs=ref, entropy=entropy)
    pg, _ = policy_loss(logprobs, old, advantages, mask, _ppo(0.2, 0.3, 3.0, "seq-mean-token-mean"))
    kl = aggregate(kl_penalty(logprobs, ref, "low_var_kl"), mask, "seq-mean-token-mean")
    ent = aggregate(entropy, mask, "seq-mean-token-mean")
    torch.testing.assert_close(loss, pg + 0.1 * kl - 0.01 * ent)
    (grad,) = torch.autograd.grad(loss, logprobs)  # the KL term pulls on the log-probs too
    (want,) = torch.autograd.grad(pg + 0.1 * kl, logprobs)
    torch.testing.assert_close(grad, want)
    torch.testing.assert_close(stats["kl"], kl.detach())
    torch.testing.assert_close(stats["entropy"], ent)
    with pytest.raises(ValueError):
        grpo_loss(logprobs, old, advantages, mask, config, entropy=entropy)  # KL in the loss needs ref


def test_max_response_length_is_taken_from_the_rollout():
    logprobs, old, _, mask, advantages = _rollout()
    unset = GRPOLossConfig(aggregation="seq-mean-token-sum-norm", kl_mode="off")  # no error until a loss needs it
    with pytest.raises(ValueError, match="max_response_length"):
        grpo_loss(logprobs, old, advantages, mask, unset)
    config = unset.with_max_response_length(8)
    assert config.max_response_length == 8 and unset.max_response_length is None  # a copy; frozen
    assert config == GRPOLossConfig(aggregation="seq-mean-token-sum-norm", kl_mode="off", max_response_length=8)
    loss, _ = grpo_loss(logprobs, old, advantages, mask, config)
    pg, _ = policy_loss(logprobs, old, advantages, mask, _ppo(0.2, 0.3, 3.0, "seq-mean-token-sum-norm", 8))
    torch.testing.assert_close(loss, pg)
    assert config.with_max_response_length(8) == config  # set to the same value: fine
    message = (
        r"model.init_args.loss.max_response_length \(8\) differs from model.init_args.rollout.max_new_tokens "
        r"\(16\): leave it unset, it is taken from the rollout"
    )
    with pytest.raises(ConfigError, match=message):
        config.with_max_response_length(16)


@pytest.mark.parametrize(
    "config",
    [
        GRPOLossConfig(kl_mode="reward", kl_coef=0.1, kl_kind="k1"),
        GRPOLossConfig(kl_mode="off"),
        GRPOLossConfig(kl_mode="loss", kl_coef=0.0),
    ],
)
def test_grpo_loss_refuses_ref_logprobs_it_would_not_use(config):
    logprobs, old, ref, mask, advantages = _rollout()
    with pytest.raises(ValueError, match="ref_logprobs given.*would not be used"):
        grpo_loss(logprobs, old, advantages, mask, config, ref_logprobs=ref)
    loss, stats = grpo_loss(logprobs, old, advantages, mask, config)
    pg, _ = policy_loss(logprobs, old, advantages, mask, _ppo(0.2, 0.3, 3.0))
    torch.testing.assert_close(loss, pg)
    assert "kl" not in stats  # in reward mode the trainer logs aggregate(token_kl(...)) itself


def test_token_kl_is_kl_penalty_on_valid_tokens_and_exactly_zero_on_padding():
    logprobs, _, ref, mask, _ = _rollout()
    padded_ref = torch.where(mask.bool(), ref, float("nan"))  # padding may hold anything
    padded_ref[0, -1] = ref[0, -1]
    padded_logprobs = torch.where(mask.bool(), logprobs, -torch.inf)
    for kind in KL_KINDS:
        per_token = token_kl(padded_logprobs, padded_ref, mask, kind)
        assert per_token.shape == mask.shape
        assert torch.equal(per_token[~mask.bool()], torch.zeros(int((mask == 0).sum())))
        torch.testing.assert_close(per_token[mask.bool()], kl_penalty(logprobs, ref, kind)[mask.bool()])
    (grad,) = torch.autograd.grad(aggregate(token_kl(padded_logprobs, padded_ref, mask, "k3"), mask), logprobs)
    assert torch.isfinite(grad).all() and torch.equal(grad[~mask.bool()], torch.zeros(int((mask == 0).sum())))
    with pytest.raises(ValueError, match="one \\(rows, L\\) shape"):
        token_kl(logprobs, ref[:, :3], mask, "k1")


def test_kl_reward_mode_changes_rewards_and_not_the_loss():
    logprobs, old, ref, mask, advantages = _rollout()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss_mode, stats = grpo_loss(logprobs, old, advantages, mask, GRPOLossConfig(kl_mode="loss"), ref_logprobs=ref)
    pg, _ = policy_loss(logprobs, old, advantages, mask, _ppo(0.2, 0.3, 3.0))
    assert not torch.allclose(loss_mode, pg)
    kl = aggregate(token_kl(logprobs, ref, mask, "low_var_kl"), mask)
    torch.testing.assert_close(stats["kl"], kl.detach())
    torch.testing.assert_close(loss_mode, pg + 1e-2 * kl)

    penalised, sequence_kl = kl_reward_penalty(rewards, logprobs, ref, mask, kl_coef=0.1, kind="k1")
    expected_kl = ((logprobs - ref) * mask).sum(-1).detach()
    torch.testing.assert_close(sequence_kl, expected_kl)
    torch.testing.assert_close(sequence_kl, token_kl(logprobs, ref, mask, "k1").sum(-1).detach())
    torch.testing.assert_close(penalised, rewards - 0.1 * expected_kl)
    assert not penalised.requires_grad
    token_rewards = torch.zeros(4, 5)
    token_rewards[torch.arange(4), mask.sum(-1) - 1] = rewards  # the reward on each response's last token
    penalised_tokens, _ = kl_reward_penalty(token_rewards, logprobs, ref, mask, kl_coef=0.1, kind="k1")
    torch.testing.assert_close(penalised_tokens.sum(-1), penalised)


def test_overlong_penalty_is_soft_over_the_buffer_and_full_for_truncated_responses():
    lengths = torch.tensor([4, 6, 7, 8, 8])
    finished = torch.tensor([True, True, True, True, False])
    # max 8, buffer 4: free up to 4 tokens, then -0.5 * excess / 4; truncated: -0.5
    shaped = overlong_penalty(lengths, finished, max_length=8, buffer=4, penalty=0.5)
    assert shaped.tolist() == pytest.approx([0.0, -0.25, -0.375, -0.5, -0.5])
    only_truncation = overlong_penalty(lengths, finished, max_length=8, buffer=0, penalty=1.0)
    assert only_truncation.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, finished, max_length=8, buffer=8, penalty=1.0)
