"""Losses: pure torch, no Lightning, so they can be checked against hand-computed values."""

from vlm_post.losses.distill import (
    TAIL_FLOOR,
    coarsened_reverse_kl,
    sampled_reverse_kl_advantages,
    sampled_reverse_kl_loss,
    topk_entropy,
    topk_reverse_kl,
    topk_reverse_kl_and_entropy_from_hidden,
    topk_reverse_kl_from_hidden,
)
from vlm_post.losses.entropy import EntropyControlConfig
from vlm_post.losses.grpo import (
    GRPOLossConfig,
    aggregate,
    group_advantages,
    groups_with_signal,
    grpo_loss,
    kl_reward_penalty,
    policy_loss,
    token_kl,
)
from vlm_post.losses.kl import kl_penalty
from vlm_post.losses.logprobs import token_logprobs, token_logprobs_and_entropy
from vlm_post.losses.overlong import OverlongConfig, check_overlong_buffer, overlong_penalty
from vlm_post.losses.rollout_correction import RolloutCorrectionConfig, rollout_correction_weights
from vlm_post.losses.sft import IGNORE_INDEX, sft_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "TAIL_FLOOR",
    "EntropyControlConfig",
    "GRPOLossConfig",
    "OverlongConfig",
    "RolloutCorrectionConfig",
    "aggregate",
    "check_overlong_buffer",
    "coarsened_reverse_kl",
    "group_advantages",
    "groups_with_signal",
    "grpo_loss",
    "kl_penalty",
    "kl_reward_penalty",
    "overlong_penalty",
    "policy_loss",
    "rollout_correction_weights",
    "sampled_reverse_kl_advantages",
    "sampled_reverse_kl_loss",
    "sft_cross_entropy",
    "token_kl",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "topk_entropy",
    "topk_reverse_kl",
    "topk_reverse_kl_and_entropy_from_hidden",
    "topk_reverse_kl_from_hidden",
]
