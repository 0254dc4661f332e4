"""Losses: pure torch, no Lightning, so they can be checked against hand-computed values."""

from vlm_post.losses.grpo import (
    GRPOLossConfig,
    aggregate,
    group_advantages,
    groups_with_signal,
    grpo_loss,
    kl_reward_penalty,
    policy_loss,
)
from vlm_post.losses.kl import kl_penalty
from vlm_post.losses.logprobs import token_logprobs, token_logprobs_and_entropy
from vlm_post.losses.sft import IGNORE_INDEX, sft_cross_entropy

__all__ = [
    "GRPOLossConfig",
    "IGNORE_INDEX",
    "aggregate",
    "group_advantages",
    "groups_with_signal",
    "grpo_loss",
    "kl_penalty",
    "kl_reward_penalty",
    "policy_loss",
    "sft_cross_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
