"""The entropy tools of RL (vlm_post/losses/entropy.py) against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from vlm_post.errors import ConfigError
from vlm_post.losses import EntropyControlConfig, GRPOLossConfig, grpo_loss
from vlm_post.losses.entropy import applied_entropy_coef, entropy_stats, high_entropy_mask, next_entropy_coef

pytestmark = pytest.mark.fast

# Two rows, the second with a padding token whose entropy (9.0) must count nowhere.
ENTROPY = torch.tensor([[0.1, 0.5, 0.9, 0.3], [2.0, 9.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])


def test_high_entropy_mask_keeps_the_tokens_at_or_above_the_quantile():
    # valid entropies sorted 0.1 0.3 0.5 0.9 2.0; the 0.6 quantile (q = 0.4) interpolates at position 0.6 * 4 = 2.4:
    # 0.5 + 0.4 * (0.9 - 0.5) = 0.66, so 0.9 and 2.0 stay
    keep = high_entropy_mask(ENTROPY, MASK, 0.4)
    assert keep.tolist() == [[False, False, True, False], [True, False, False, False]]
    assert torch.equal(high_entropy_mask(ENTROPY, MASK, 1.0), MASK.bool())
    # q near 0: the highest token (0.8 quantile 2.0 at position 4) alone
    assert high_entropy_mask(ENTROPY, MASK, 1e-6).sum() == 1


def test_entropy_stats_read_the_top_fifth_and_the_share_above_a_threshold():
    values = torch.tensor([0.1, 0.5, 0.9, 0.3, 2.0, 0.7, 0.2, 0.4, 0.6, 1.0])
    stats = entropy_stats(values, threshold=0.672)
    torch.testing.assert_close(stats["entropy_top20_mean"], torch.tensor((2.0 + 1.0) / 2))  # the 2 highest of 10
    torch.testing.assert_close(stats["entropy_above_threshold"], torch.tensor(4 / 10))  # 0.9, 2.0, 0.7, 1.0
    # 3 tokens: the top 20% is ceil(0.6) = 1 token
    torch.testing.assert_close(
        entropy_stats(torch.tensor([1.0, 3.0, 2.0]), 5.0)["entropy_top20_mean"], torch.tensor(3.0)
    )
    assert entropy_stats(torch.zeros(0), 0.5) == {}


def test_adaptive_control_steps_the_coefficient_towards_the_target_within_its_bounds():
    control = EntropyControlConfig(target=0.5, delta=0.1, coef_min=0.0, coef_max=0.25)
    coef, trace = 0.0, []
    for entropy in [0.4, 0.5, 0.3, 0.6, 0.9, 0.9, 0.9]:  # at or below 0.5: up; above: down
        coef = next_entropy_coef(coef, entropy, control)
        trace.append(round(coef, 10))
    assert trace == [0.1, 0.2, 0.25, 0.15, 0.05, 0.0, 0.0]
    assert applied_entropy_coef(0.15, None, control) == 0.0  # nothing measured yet
    assert applied_entropy_coef(0.15, 0.5, control) == 0.15
    assert applied_entropy_coef(0.15, 0.51, control) == 0.0  # above the target: no bonus
    with pytest.raises(ConfigError, match="coef_min 0.3 is above coef_max 0.2"):
        EntropyControlConfig(coef_min=0.3, coef_max=0.2)


def test_grpo_loss_trains_and_rewards_entropy_only_on_the_kept_tokens():
    # on-policy (ratio 1), advantages +1 and -2, q 0.4 keeps tokens (0, 2) and (1, 0) of the 5 valid ones:
    # pg = token-mean over 5 tokens of -A on the kept ones = (-1 + 2) / 5 = 0.2; the entropy bonus 0.1 * the kept
    # tokens' mean entropy (0.9 + 2.0) / 2 = 1.45
    logprobs = torch.zeros(2, 4, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0])
    config = GRPOLossConfig(kl_mode="off", top_entropy_quantile=0.4, entropy_coef=0.1)
    loss, stats = grpo_loss(logprobs, logprobs, advantages, MASK, config, entropy=ENTROPY)
    torch.testing.assert_close(stats["pg_loss"], torch.tensor(0.2))
    torch.testing.assert_close(loss, torch.tensor(0.2 - 0.1 * 1.45))
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad.nonzero().tolist() == [[0, 2], [1, 0]]  # no other token learns
    torch.testing.assert_close(stats["entropy"], torch.tensor((0.1 + 0.5 + 0.9 + 0.3 + 2.0) / 5))  # all tokens
    torch.testing.assert_close(stats["_policy_entropy"], torch.tensor([0.9, 2.0]))
    assert len(stats["_entropy"]) == 5
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        grpo_loss(logprobs, logprobs, advantages, MASK, config)


def test_the_controller_steps_on_a_steps_token_mean_and_ignores_a_non_finite_step(tiny_model):
    from vlm_post.modules import RLModule
    from vlm_post.rollout import SamplingParams

    control = EntropyControlConfig(target=0.5, delta=0.1)
    module = RLModule(str(tiny_model), rollout=SamplingParams(n=2, max_new_tokens=4),
                      loss=GRPOLossConfig(entropy_coef=0.2, entropy_control=control))  # fmt: skip
    assert module.applied_entropy_coef() == 0.0  # nothing measured yet
    module.after_optimizer_step({"_policy_entropy": torch.tensor([0.1, 0.3, 0.5])})  # mean 0.3 <= 0.5: up
    assert (module.entropy_coef, module.last_policy_entropy) == (pytest.approx(0.3), pytest.approx(0.3))
    assert module.applied_entropy_coef() == pytest.approx(0.3)
    module.after_optimizer_step({"_policy_entropy": torch.tensor([float("nan"), 0.3])})  # a non-finite step
    module.after_optimizer_step({})  # a step without tokens
    assert (module.entropy_coef, module.last_policy_entropy) == (pytest.approx(0.3), pytest.approx(0.3))
    module.after_optimizer_step({"_policy_entropy": torch.tensor([0.9])})  # above: down, and no bonus
    assert module.entropy_coef == pytest.approx(0.2) and module.applied_entropy_coef() == 0.0
