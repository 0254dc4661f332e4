"""Entropy tools of RL: training on the highest-entropy tokens, entropy statistics, adaptive entropy control.

Pure torch on the per-token entropies that RL's chunked log-prob pass already computes (no extra forward).

- ``high_entropy_mask`` (Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939; TRL's
  ``top_entropy_quantile``): the policy loss keeps only the tokens whose entropy is at least the (1 - q) quantile
  of the valid tokens' entropies (linear interpolation, ``torch.quantile``, as TRL): about the top q of them.
- ``entropy_stats``: the mean entropy of the highest-entropy 20% of tokens (the paper's "forking tokens") and the
  share of tokens above an entropy threshold; both read the entropy regime beyond its mean.
- ``next_entropy_coef`` (Skywork-OR1, arXiv 2505.22312; TRL's ``use_adaptive_entropy``): after every optimizer
  step the entropy bonus's coefficient moves by ``delta`` towards holding the entropy at ``target``: up when the
  step's entropy is at or below it, down otherwise, within [coef_min, coef_max]; the bonus applies only while the
  last measured entropy is at or below the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlm_post.ranges import NonNegativeFloat, PositiveFloat, check_ranges

TOP_FRACTION = 0.2  # the share of highest-entropy tokens whose mean entropy_stats reports (the 80/20 paper's)


def high_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """bool (rows, L): the valid tokens of ``response_mask`` whose entropy is >= the (1 - ``quantile``) quantile of
    the valid tokens' entropies. ``quantile`` 1 keeps every valid token; near 0, only the highest (and its ties).
    No valid token: all False."""
    valid = response_mask.bool()
    values = entropy.detach()[valid].float()
    if quantile >= 1.0 or values.numel() == 0:
        return valid
    threshold = torch.quantile(values, 1.0 - quantile)
    return valid & (entropy.detach() >= threshold.to(entropy.dtype))


def entropy_stats(entropies: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """From the 1-D entropies of a step's tokens: ``entropy_top20_mean``, the mean over the ceil(20%) highest, and
    ``entropy_above_threshold``, the share of tokens whose entropy exceeds ``threshold``. Empty: no stats."""
    if entropies.numel() == 0:
        return {}
    values = entropies.detach().float().flatten()
    top = values.topk(max(1, math.ceil(TOP_FRACTION * values.numel()))).values
    return {"entropy_top20_mean": top.mean(), "entropy_above_threshold": (values > threshold).float().mean()}


@dataclass(frozen=True)
class EntropyControlConfig:
    """Adaptive entropy control (Skywork-OR1): ``loss.entropy_coef`` is the coefficient's start value. TRL's
    defaults, except ``target``, which has none that fits every model: set it near the entropy early RL logs."""

    target: NonNegativeFloat = 0.2
    """The entropy (nats, token mean over the tokens of the policy loss) to hold; the bonus applies at or below it."""
    delta: PositiveFloat = 0.005
    """The coefficient's change per optimizer step."""
    coef_min: NonNegativeFloat = 0.0
    """The coefficient's lower bound."""
    coef_max: NonNegativeFloat = 1.0
    """The coefficient's upper bound."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.coef_min > self.coef_max:
            from vlm_post.errors import ConfigError

            raise ConfigError(
                f"loss.entropy_control: coef_min {self.coef_min} is above coef_max {self.coef_max}; swap them"
            )


def next_entropy_coef(coef: float, entropy: float, config: EntropyControlConfig) -> float:
    """The coefficient after an optimizer step whose token-mean entropy was ``entropy``."""
    if entropy <= config.target:
        return float(min(coef + config.delta, config.coef_max))
    return float(max(coef - config.delta, config.coef_min))


def applied_entropy_coef(coef: float, last_entropy: float | None, config: EntropyControlConfig) -> float:
    """The coefficient the loss uses now: ``coef`` while the last step's entropy was at or below the target, else 0
    (before the first step, with no entropy measured yet, 0: as TRL, whose last entropy starts at infinity)."""
    return coef if last_entropy is not None and last_entropy <= config.target else 0.0
