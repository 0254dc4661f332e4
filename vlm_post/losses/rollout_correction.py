"""Rollout correction: importance weights for samples drawn by an engine whose distribution is not the trainer's.

A vLLM engine samples with its own kernels (and in bf16, its own rounding), so the distribution the tokens came
from, pi_rollout, differs a little from the trainer's pi_train at the same weights. The policy gradient estimated
from those samples is then biased. The correction reweights each token (or each sequence) of the loss by

    w = pi_train(x) / pi_rollout(x)        (token level: per token; sequence level: the product over the response)

computed from the trainer's log-probs of the rollout policy (a no-grad forward before the update) and the
sampler's log-probs of the tokens it drew. Two ways to keep w from exploding, as in TRL (``vllm_importance_sampling_
mode``) and verl (``rollout_is``, ``rollout_rs``):

- ``tis``: truncated importance sampling, w clipped to [lower, cap] (lower: 0 unless set);
- ``mask``: w kept where it lies in [lower, cap], 0 outside (the token or the whole sequence leaves the loss).

The weights are constants (no gradient). ``rollout_correction_weights`` is pure torch on (rows, L) tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.losses.kl import LOG_RATIO_CLAMP
from vlm_post.ranges import NonNegativeFloat, PositiveFloat, check_ranges


@dataclass
class RolloutCorrectionConfig:
    """How to correct for the rollout engine's distribution (``loss.rollout_correction``); ``mode: off`` by default.

    Args:
        mode: ``off``, ``tis`` (weights clipped to [lower, cap]) or ``mask`` (weights outside [lower, cap] set to 0).
        level: ``token`` (a weight per token) or ``sequence`` (one weight per response: the product of its
            tokens' ratios, applied to every token).
        cap: the upper bound (TRL's ``vllm_importance_sampling_clip_max``, verl's ``rollout_is_threshold``).
        lower: the lower bound (default: none; TRL's ``..._clip_min``).
    """

    mode: Literal["off", "tis", "mask"] = "off"
    level: Literal["token", "sequence"] = "token"
    cap: PositiveFloat = 2.0
    lower: NonNegativeFloat | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.lower is not None and self.lower > self.cap:
            raise ConfigError(
                f"loss.rollout_correction: lower ({self.lower}) is above cap ({self.cap}): no weight would remain"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def rollout_correction_weights(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    config: RolloutCorrectionConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(rows, L) weights for the token losses, 0 on padding, and their stats.

    ``trainer_logprobs``: the trainer's log-probs of the sampled tokens under the rollout policy (before any
    update); ``sampler_logprobs``: the engine's, of the distribution it drew from. Stats (detached scalars, over
    valid tokens): ``kl`` (the k3 estimate of KL(pi_rollout || pi_train) at the sampled tokens, (w - 1) -
    log w per token before any bound), ``weight_mean`` and ``weight_max`` (the weights applied), and
    ``masked`` (the share of tokens whose weight is 0 by the bounds).
    """
    if not config.enabled:
        raise ValueError("rollout_correction_weights with mode 'off': there is nothing to weight")
    if trainer_logprobs.shape != sampler_logprobs.shape or trainer_logprobs.shape != response_mask.shape:
        shapes = f"{tuple(trainer_logprobs.shape)}, {tuple(sampler_logprobs.shape)}, {tuple(response_mask.shape)}"
        raise ValueError(
            f"expected trainer_logprobs, sampler_logprobs and response_mask of one (rows, L) shape, got {shapes}"
        )
    valid = response_mask.bool()
    with torch.no_grad():
        token_log_ratio = (trainer_logprobs.float() - sampler_logprobs.float()).masked_fill(~valid, 0.0)
        log_ratio = token_log_ratio
        if config.level == "sequence":
            log_ratio = token_log_ratio.sum(-1, keepdim=True)
        ratio = log_ratio.clamp(max=LOG_RATIO_CLAMP).exp()  # e^20 is past any cap: the bound decides the same
        lower = config.lower if config.lower is not None else (0.0 if config.mode == "tis" else -math.inf)
        if config.mode == "tis":
            weights = ratio.clamp(min=lower, max=config.cap)
            out_of_bounds = torch.zeros_like(ratio, dtype=torch.bool)
        else:
            out_of_bounds = (ratio < lower) | (ratio > config.cap)
            weights = ratio.masked_fill(out_of_bounds, 0.0)
        weights = weights.expand_as(token_log_ratio).masked_fill(~valid, 0.0)
        if not valid.any():
            return weights, {name: weights.new_zeros(()) for name in ("kl", "weight_mean", "weight_max", "masked")}
        clamped = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = (clamped.exp() - 1.0) - clamped
        stats = {
            "kl": k3[valid].mean(),
            "weight_mean": weights[valid].mean(),
            "weight_max": weights[valid].max(),
            "masked": out_of_bounds.expand_as(valid)[valid].float().mean(),
        }
    return weights, stats
