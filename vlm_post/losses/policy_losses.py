"""Policy losses of the GRPO family, a registry of pure functions keyed by ``loss.policy_loss``.

Each turns the policy's log-probs of the sampled tokens, those of the policy that sampled (``old``, constant) and
the advantages into per-token losses, before the rollout correction's weights, the top-entropy mask and the
aggregation that ``policy_loss`` (grpo.py) applies to every one of them alike. With r = pi / pi_old per token:

- ``ppo`` (verl ``vanilla``): max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and for A < 0 at most
  dual_clip * |A| (dual clip, Ye et al. 2020).
- ``gspo`` (Zheng et al. 2025, arXiv 2507.18071): one ratio per sequence, s = exp(mean_t log r_t), the geometric
  mean of its tokens' ratios, clipped like PPO's; every token of the sequence carries the sequence's loss, so with
  ``seq-mean-token-mean`` (required) the loss is the mean over sequences.
- ``gspo_token``: GSPO's token form, s_t = sg[s] * pi_t / sg[pi_t]: the value of s at every token, the gradient of
  token t alone, so token-level advantages may differ along a sequence. With one advantage per sequence its loss and
  gradient are those of ``gspo``.
- ``sapo`` (Gao et al. 2025, arXiv 2511.20347): no hard clip, a soft gate -A * (4 / tau) * sigmoid(tau (r - 1)),
  tau = sapo_tau_pos for A > 0 and sapo_tau_neg otherwise. Its gradient at r = 1 is PPO's, and it fades smoothly
  as r leaves 1 (the faster, the larger tau).
- ``cispo`` (MiniMax-M1, arXiv 2506.13585): REINFORCE weighted by the clipped, stop-gradient importance weight,
  -sg[min(r, cispo_max_weight)] * A * log pi. No token loses its gradient; a large ratio only stops growing its
  weight (no lower bound, as in the paper and TRL).

Adding one is one function: ``@register_policy_loss("name")`` and the name in ``PolicyLossName``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from vlm_post.losses.kl import LOG_RATIO_CLAMP

if TYPE_CHECKING:
    from vlm_post.losses.grpo import GRPOLossConfig

PolicyLossName = Literal["ppo", "gspo", "gspo_token", "sapo", "cispo"]


@dataclass
class TokenLosses:
    """A policy loss per token, (rows, L), and what its stats read.

    ``ratio``: the importance ratio it used per token (detached; for GSPO the sequence's ratio at each token).
    ``flags``: bool (rows, L) per stat name, e.g. ``clip_fraction``: the tokens where a clip is active.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    flags: dict[str, torch.Tensor] = field(default_factory=dict)


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "GRPOLossConfig"], TokenLosses]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register ``fn(logprobs, old_logprobs, advantages, response_mask, config) -> TokenLosses`` as ``name``.

    ``old_logprobs`` come detached; ``advantages`` are (rows, 1) or (rows, L), detached, in the log-probs' dtype.
    """

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def _log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    # clamped so that exp stays finite (as verl does); inside the clamp the gradient is the ratio's own
    return (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("ppo")
def ppo_loss(logprobs, old_logprobs, advantages, response_mask, config) -> TokenLosses:
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))
    loss, clip_active = _clipped_surrogate(ratio, advantages, config.clip_low, config.clip_high)
    dual_clip_active = torch.zeros_like(clip_active)
    if config.dual_clip is not None:
        cap = (-advantages * config.dual_clip).expand_as(loss)  # = dual_clip * |A| where A < 0; no gradient
        dual_clip_active = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clip_active, cap, loss)
    return TokenLosses(loss, ratio.detach(), {"clip_fraction": clip_active, "dual_clip_fraction": dual_clip_active})


def _sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor):
    """(rows, 1): the mean log ratio over each row's valid tokens (0 for a row without any)."""
    valid = response_mask.bool()
    log_ratio = torch.where(valid, logprobs - old_logprobs, logprobs.new_zeros(()))
    return log_ratio.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)


@register_policy_loss("gspo")
def gspo_loss(logprobs, old_logprobs, advantages, response_mask, config) -> TokenLosses:
    log_s = _sequence_log_ratio(logprobs, old_logprobs, response_mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_s).expand_as(logprobs)
    loss, clip_active = _clipped_surrogate(ratio, advantages, config.clip_low, config.clip_high)
    return TokenLosses(loss, ratio.detach(), {"clip_fraction": clip_active})


@register_policy_loss("gspo_token")
def gspo_token_loss(logprobs, old_logprobs, advantages, response_mask, config) -> TokenLosses:
    log_s = _sequence_log_ratio(logprobs.detach(), old_logprobs, response_mask)
    # sg[log s] + log pi - sg[log pi]: the value of log s, the gradient of log pi_t (verl orders it so for precision)
    log_ratio = (logprobs - logprobs.detach() + log_s).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss, clip_active = _clipped_surrogate(ratio, advantages, config.clip_low, config.clip_high)
    return TokenLosses(loss, ratio.detach(), {"clip_fraction": clip_active})


@register_policy_loss("sapo")
def sapo_loss(logprobs, old_logprobs, advantages, response_mask, config) -> TokenLosses:
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))
    tau = torch.where(advantages > 0, config.sapo_tau_pos, config.sapo_tau_neg).to(ratio.dtype)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return TokenLosses(-gate * advantages, ratio.detach())


@register_policy_loss("cispo")
def cispo_loss(logprobs, old_logprobs, advantages, response_mask, config) -> TokenLosses:
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))
    weight = ratio.detach().clamp(max=config.cispo_max_weight)
    loss = -weight * advantages * logprobs
    return TokenLosses(loss, ratio.detach(), {"clip_fraction": ratio.detach() > config.cispo_max_weight})
