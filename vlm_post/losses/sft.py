"""Supervised fine-tuning loss: token-mean cross-entropy on assistant tokens only."""

from __future__ import annotations

import torch

from vlm_post.losses.logprobs import token_logprobs

IGNORE_INDEX = -100


def sft_cross_entropy(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over positions whose label is not IGNORE_INDEX.

    ``hidden`` (B, T, H) are the decoder's last hidden states, ``labels`` (B, T)
    the input ids with prompt, image and padding positions set to IGNORE_INDEX.
    Position t predicts label t+1. Returns (loss, number of target tokens).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    logprobs = token_logprobs(hidden[:, :-1][mask], head_weight, targets[mask], chunk_size)
    return -logprobs.mean(), count
