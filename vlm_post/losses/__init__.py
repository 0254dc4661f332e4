"""Losses: pure torch, no Lightning, so they can be checked against hand-computed values."""

from vlm_post.losses.logprobs import token_logprobs, token_logprobs_and_entropy
from vlm_post.losses.sft import IGNORE_INDEX, sft_cross_entropy

__all__ = ["IGNORE_INDEX", "sft_cross_entropy", "token_logprobs", "token_logprobs_and_entropy"]
