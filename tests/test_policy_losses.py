"""The policy losses of the registry (vlm_post/losses/policy_losses.py) against values computed by hand from their
papers' formulas; the comparisons with TRL's code are in tests/test_trl_losses.py."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_post.errors import ConfigError
from vlm_post.losses import GRPOLossConfig, policy_loss
from vlm_post.losses.policy_losses import POLICY_LOSSES

pytestmark = pytest.mark.fast


def _config(policy_loss: str, **kwargs) -> GRPOLossConfig:
    kwargs.setdefault("aggregation", "seq-mean-token-mean")
    return GRPOLossConfig(policy_loss=policy_loss, kl_mode="off", dual_clip=None, **kwargs)


def _rows(log_ratios: list[list[float]], old: float = -1.0):
    """(rows, L) log-probs whose log ratios to ``old`` are given, padded with 0 where a row is shorter."""
    width = max(len(row) for row in log_ratios)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in log_ratios])
    ratios = torch.tensor([row + [0.0] * (width - len(row)) for row in log_ratios])
    old_logprobs = torch.full(ratios.shape, old)
    return (old_logprobs + ratios).requires_grad_(), old_logprobs, mask


def test_every_name_of_the_config_is_registered():
    from vlm_post.losses.grpo import POLICY_LOSS_NAMES

    assert set(POLICY_LOSS_NAMES) == set(POLICY_LOSSES)


# GSPO, clip 0.2 / 0.3 (the sequence ratio is clipped to [0.8, 1.3]):
#   row 0: log ratios 0.1, 0.3       -> mean 0.2, s = e^0.2 = 1.221403, A = +1: not clipped, loss -1.221403
#   row 1: log ratios -0.5, -0.1, -0.3 -> mean -0.3, s = e^-0.3 = 0.740818, A = -2: -A s = 1.481636 < -A * 0.8 = 1.6,
#          clipped, loss 1.6 (no gradient)
# seq-mean: (-1.221403 + 1.6) / 2 = 0.1892985. Gradient of row 0's tokens: d(-A s)/dlogp_t = -A s / 2 (s is the
# mean's exp over 2 tokens), over 2 sequences: -1.221403 / 4 = -0.30535 each.
GSPO_LOG_RATIOS = [[0.1, 0.3], [-0.5, -0.1, -0.3]]
GSPO_ADVANTAGES = torch.tensor([1.0, -2.0])


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_clips_the_geometric_mean_ratio_of_each_sequence(name):
    logprobs, old, mask = _rows(GSPO_LOG_RATIOS)
    loss, stats = policy_loss(logprobs, old, GSPO_ADVANTAGES, mask, _config(name, clip_low=0.2, clip_high=0.3))
    torch.testing.assert_close(loss, torch.tensor(0.1892985))
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-0.3053507, -0.3053507, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(3 / 5))  # row 1's 3 tokens of 5
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.221403))  # the sequence's ratio, not a token's


def test_gspo_token_takes_token_advantages_each_for_its_own_token():
    # row 0 of the table with advantages 1 and 3 along it: s_t = sg[s] pi_t / sg[pi_t], so token t's gradient is
    # -A_t s / |y| / rows = -A_t * 1.221403 / 2 / 1
    logprobs, old, mask = _rows(GSPO_LOG_RATIOS[:1])
    advantages = torch.tensor([[1.0, 3.0]])
    loss, _ = policy_loss(logprobs, old, advantages, mask, _config("gspo_token", clip_low=0.2, clip_high=0.3))
    torch.testing.assert_close(loss, torch.tensor(-(1.0 + 3.0) * 1.221403 / 2))
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-0.6107015, -1.8321045]]))


def test_gspo_refuses_a_token_aggregation():
    with pytest.raises(ConfigError, match="gspo is a loss per sequence.*seq-mean-token-mean"):
        _config("gspo", aggregation="token-mean")
    _config("gspo_token", aggregation="token-mean")  # the token form is a token loss


# SAPO, gate f(r) = (4 / tau) sigmoid(tau (r - 1)), loss -f A; tau_pos 1.0 for A > 0, tau_neg 1.05 otherwise:
#   r 1.5, A +1:  4 * sigmoid(0.5) = 4 * 0.6224593 = 2.4898373           -> loss -2.4898373
#   r 0.5, A -1:  (4 / 1.05) * sigmoid(-0.525) = 3.8095238 * 0.3716862 = 1.4159474 -> loss +1.4159474
#   r 1.0, A +2:  4 * sigmoid(0) = 2                                      -> loss -4
# Gradient in log pi: -A (4/tau) sigmoid' tau r = -A * 4 s (1 - s) * r, s the sigmoid:
#   -1 * 4 * 0.6224593 * 0.3775407 * 1.5 = -1.4100448;  +1 * 4 * 0.3716862 * 0.6283138 * 0.5 = 0.4670667;  -2
def test_sapo_gates_the_ratio_softly_with_the_temperature_of_the_advantage_sign():
    logprobs, old, mask = _rows([[math.log(1.5)], [math.log(0.5)], [0.0]])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    loss, stats = policy_loss(logprobs, old, advantages, mask, _config("sapo"))
    torch.testing.assert_close(loss, torch.tensor((-2.4898373 + 1.4159474 - 4.0) / 3))
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.4100448], [0.4670667], [-2.0]]) / 3)
    assert "clip_fraction" not in stats  # nothing is clipped


def test_sapo_gradient_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    logprobs = torch.randn(3, 4, requires_grad=True)
    advantages = torch.tensor([0.5, -1.5, 2.0])
    mask = torch.ones(3, 4)
    sapo, _ = policy_loss(logprobs, logprobs, advantages, mask, _config("sapo", sapo_tau_neg=3.0))
    ppo, _ = policy_loss(logprobs, logprobs, advantages, mask, _config("ppo"))
    torch.testing.assert_close(torch.autograd.grad(sapo, logprobs)[0], torch.autograd.grad(ppo, logprobs)[0])


# CISPO, weight w = sg[min(r, 5)], loss -w A log pi (old log-probs -1, so log pi = -1 + log r):
#   r 0.5, A +1:  w 0.5, log pi -1.6931472 -> loss  0.8465736, gradient -0.5
#   r 2.0, A +1:  w 2.0, log pi -0.3068528 -> loss  0.6137056, gradient -2.0
#   r 8.0, A -1:  w 5.0 (capped), log pi 1.0794415 -> loss 5.3972077, gradient +5.0
def test_cispo_weighs_reinforce_by_the_capped_stop_gradient_ratio():
    logprobs, old, mask = _rows([[math.log(0.5), math.log(2.0), math.log(8.0)]])
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, _config("cispo", aggregation="token-mean"))
    torch.testing.assert_close(loss, torch.tensor((0.8465736 + 0.6137056 + 5.3972077) / 3))
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -2.0, 5.0]]) / 3)  # no token loses its gradient
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(1 / 3))


def test_top_entropy_tokens_mask_keeps_the_others_in_the_token_count():
    logprobs, old, mask = _rows([[0.0, 0.0, 0.0, 0.0]])
    keep = torch.tensor([[True, False, False, True]])
    loss, _ = policy_loss(
        logprobs, old, torch.tensor([1.0]), mask, _config("ppo", aggregation="token-mean"), None, keep
    )
    torch.testing.assert_close(loss, torch.tensor(-2.0 / 4))  # two tokens of -1, four in the count


def test_an_unknown_policy_loss_is_one_line():
    with pytest.raises(ConfigError, match="loss.policy_loss: unknown 'grpo2'"):
        GRPOLossConfig(policy_loss="grpo2")
