"""Per-token log-probs from hidden states, chunked over tokens.

Qwen2.5-VL's vocabulary has 151,936 entries: the fp32 logits of 8 x 1024
tokens alone take 5 GB. We never build them for the whole batch. Each chunk of
tokens is projected, reduced to what the loss needs, and (when training)
recomputed in the backward pass instead of kept, so peak memory is one chunk's
logits whatever the batch.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (N, H) under the head ``weight`` (V, H); returns (N,) fp32."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    outputs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            outputs.append(checkpoint(_chunk_logprobs, h, weight, t, use_reentrant=False))
        else:
            outputs.append(_chunk_logprobs(h, weight, t))
    return torch.cat(outputs)
