"""Reward shaping for responses that run out of tokens (DAPO's overlong handling), pure torch.

Without it, a policy whose correct answer sits early in a truncated response
is rewarded for never emitting EOS: on the CPU demo, GRPO learnt to repeat
``\\boxed{red}`` until ``max_new_tokens``. DAPO (Yu et al. 2025) offers two fixes:

- soft overlong punishment: once a response is longer than
  ``max_length - buffer`` tokens, subtract ``penalty * excess / buffer`` from
  its reward, reaching ``penalty`` at ``max_length``;
- overlong filtering: leave truncated responses out of the loss altogether
  (``truncated_rows_mask``), so they are neither rewarded nor punished.

A truncated response (no EOS within ``max_length``) always gets the full
``penalty``; with ``buffer == 0`` that is the only case punished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_post.errors import ConfigError
from vlm_post.ranges import NonNegativeFloat, NonNegativeInt, check_ranges


@dataclass
class OverlongConfig:
    """How RL treats long and truncated responses (DAPO).

    Args:
        penalty: reward subtracted from a truncated response (0: no punishment).
        buffer: soft punishment over the last ``buffer`` tokens before ``max_new_tokens``, growing
            linearly to ``penalty`` (0: only truncation is punished).
        filter_truncated: leave truncated responses out of the loss (their tokens get no gradient).
    """

    penalty: NonNegativeFloat = 0.0
    buffer: NonNegativeInt = 0
    filter_truncated: bool = False

    def __post_init__(self) -> None:
        check_ranges(self)


def check_overlong_buffer(buffer: int, max_new_tokens: int) -> None:
    """The soft-punishment buffer lies inside the response budget."""
    if buffer >= max_new_tokens:
        raise ConfigError(
            f"model.init_args.overlong.buffer ({buffer}) must be below model.init_args.rollout.max_new_tokens "
            f"({max_new_tokens})"
        )


def overlong_penalty(
    lengths: torch.Tensor, finished: torch.Tensor, max_length: int, buffer: int, penalty: float
) -> torch.Tensor:
    """(rows,) non-positive reward shaping for responses of ``lengths`` tokens (``finished``: ended by EOS)."""
    check_overlong_buffer(buffer, max_length)
    lengths = lengths.float()
    if buffer > 0:
        excess = (lengths - (max_length - buffer)).clamp(min=0) / buffer
        shaped = -penalty * excess.clamp(max=1.0)
    else:
        shaped = torch.zeros_like(lengths)
    return torch.where(finished.bool(), shaped, torch.full_like(shaped, -penalty))
