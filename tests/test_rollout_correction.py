"""Rollout correction weights against values computed by hand: truncated and masked importance sampling, per token
and per sequence, and their stats."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_post.errors import ConfigError
from vlm_post.losses.rollout_correction import RolloutCorrectionConfig, rollout_correction_weights

pytestmark = pytest.mark.fast

# Row 0: token ratios pi_train / pi_rollout of 1.5, 0.5 and 4 (sequence ratio 3), then padding; row 1: ratio 1 on
# its two tokens (sequence ratio 1).
TRAINER = torch.tensor([[math.log(1.5), math.log(0.5), math.log(4.0), 7.0], [-1.0, -2.0, 5.0, 5.0]])
SAMPLER = torch.tensor([[0.0, 0.0, 0.0, -3.0], [-1.0, -2.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def weights(mode, level="token", cap=2.0, lower=None):
    config = RolloutCorrectionConfig(mode=mode, level=level, cap=cap, lower=lower)
    return rollout_correction_weights(TRAINER, SAMPLER, MASK, config)


@pytest.mark.parametrize(
    ("mode", "level", "cap", "lower", "expected", "masked"),
    [
        ("tis", "token", 2.0, None, [[1.5, 0.5, 2.0, 0], [1, 1, 0, 0]], 0.0),
        ("tis", "token", 2.0, 0.8, [[1.5, 0.8, 2.0, 0], [1, 1, 0, 0]], 0.0),
        ("mask", "token", 2.0, None, [[1.5, 0.5, 0.0, 0], [1, 1, 0, 0]], 1 / 5),
        ("mask", "token", 2.0, 0.8, [[1.5, 0.0, 0.0, 0], [1, 1, 0, 0]], 2 / 5),
        ("tis", "sequence", 2.0, None, [[2.0, 2.0, 2.0, 0], [1, 1, 0, 0]], 0.0),
        ("mask", "sequence", 2.0, None, [[0.0, 0.0, 0.0, 0], [1, 1, 0, 0]], 3 / 5),
        ("mask", "sequence", 4.0, None, [[3.0, 3.0, 3.0, 0], [1, 1, 0, 0]], 0.0),
        ("mask", "sequence", 4.0, 1.5, [[3.0, 3.0, 3.0, 0], [0, 0, 0, 0]], 2 / 5),
    ],
)
def test_weights_by_hand(mode, level, cap, lower, expected, masked):
    got, stats = weights(mode, level, cap, lower)
    expected = torch.tensor(expected)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    valid = MASK.bool()
    torch.testing.assert_close(stats["weight_mean"], expected[valid].mean())
    torch.testing.assert_close(stats["weight_max"], expected[valid].max())
    torch.testing.assert_close(stats["masked"], torch.tensor(masked))


def test_the_mismatch_kl_is_the_k3_estimate_over_the_valid_tokens():
    _, stats = weights("tis")
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 4.0, 1.0, 1.0)]
    torch.testing.assert_close(stats["kl"], torch.tensor(sum(k3) / 5))


def test_the_weights_are_constants():
    trainer = TRAINER.clone().requires_grad_(True)
    got, _ = rollout_correction_weights(trainer, SAMPLER, MASK, RolloutCorrectionConfig(mode="tis"))
    assert not got.requires_grad


def test_a_huge_sequence_ratio_is_bounded_not_infinite():
    trainer = torch.full((1, 8), 30.0)  # 8 tokens of log-ratio 30: e^240 overflows fp32
    got, stats = rollout_correction_weights(
        trainer, torch.zeros(1, 8), torch.ones(1, 8), RolloutCorrectionConfig(mode="tis", level="sequence", cap=3.0)
    )
    assert torch.equal(got, torch.full((1, 8), 3.0)) and all(torch.isfinite(v) for v in stats.values())


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="lower .* is above cap"):
        RolloutCorrectionConfig(mode="mask", cap=2.0, lower=3.0)
    with pytest.raises(ValueError, match="mode 'off'"):
        rollout_correction_weights(TRAINER, SAMPLER, MASK, RolloutCorrectionConfig())


def test_the_weights_multiply_the_policy_losss_tokens():
    from vlm_post.losses import GRPOLossConfig, grpo_loss, policy_loss

    torch.manual_seed(0)
    logprobs = torch.randn(2, 4, requires_grad=True)
    old, advantages = logprobs.detach() + 0.1 * torch.randn(2, 4), torch.tensor([1.0, -1.0])
    config = GRPOLossConfig(kl_mode="off", rollout_correction=RolloutCorrectionConfig(mode="tis"))
    rollout_weights, _ = rollout_correction_weights(TRAINER, SAMPLER, MASK, config.rollout_correction)
    loss, _ = grpo_loss(logprobs, old, advantages, MASK, config, rollout_weights=rollout_weights)
    # by hand: the unweighted token losses (seq-mean of one-token masks picks each), weighted, token-mean
    token_losses = torch.stack(
        [
            policy_loss(
                logprobs, old, advantages, MASK * (torch.arange(8).view(2, 4) == i), GRPOLossConfig(kl_mode="off")
            )[0]
            for i in range(8)
        ]
    ).view(2, 4)
    expected = (token_losses * rollout_weights * MASK).sum() / MASK.sum()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="rollout_correction is on"):
        grpo_loss(logprobs, old, advantages, MASK, config)
    with pytest.raises(ValueError, match="rollout_correction is off"):
        grpo_loss(logprobs, old, advantages, MASK, GRPOLossConfig(kl_mode="off"), rollout_weights=rollout_weights)


def test_rl_refuses_the_correction_with_the_samplers_old_logprobs(tiny_model):
    from tests.test_rl import rl_module
    from vlm_post.losses import GRPOLossConfig

    loss = GRPOLossConfig(kl_mode="off", rollout_correction=RolloutCorrectionConfig(mode="tis"))
    with pytest.raises(ConfigError, match="rollout_correction .* use old_logprobs: recompute"):
        rl_module(tiny_model, loss=loss, old_logprobs="sampler")


def test_rows_without_response_tokens_give_zero_weights_and_stats():
    got, stats = rollout_correction_weights(
        TRAINER, SAMPLER, torch.zeros_like(MASK), RolloutCorrectionConfig(mode="tis")
    )
    assert torch.equal(got, torch.zeros_like(TRAINER)) and all(float(v) == 0.0 for v in stats.values())
