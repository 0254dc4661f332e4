"""Log-probs of a batch's response tokens under any model of the project: the policy, the reference, the teacher.

``batch_logprobs`` is the one way from model rows to per-token numbers: the decoder's hidden states at the
response positions (``response_hidden_states``: shared prompts run once), then one chunked pass over the
vocabulary (``losses.logprobs.head_scores``) that gives what the caller asks for: the log-probs of the sampled
tokens or of given ids (a teacher's top k), the full-vocabulary entropy, the model's own top-k. The full-vocabulary
logits never exist at once. Results come back padded like ``rows.response_mask``, zero where it is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlm_post.losses.logprobs import DEFAULT_CHUNK_SIZE, head_scores
from vlm_post.models.forward import response_hidden_states
from vlm_post.models.sharding import is_sharded

if TYPE_CHECKING:
    from vlm_post.rollout.batch import ModelRows


@dataclass
class ResponseScores:
    """Per response position of R rows of L tokens; zero where the response mask is 0."""

    logprobs: torch.Tensor  # [R, L]: of the sampled tokens; [R, L, m] of the ids asked for
    entropy: torch.Tensor | None  # [R, L], full vocabulary
    topk_ids: torch.Tensor | None  # int32 [R, L, k], the model's most likely ids
    topk_logprobs: torch.Tensor | None  # [R, L, k]


def batch_logprobs(
    model: torch.nn.Module,
    rows: ModelRows,
    *,
    ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    top_k: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ResponseScores:
    """What ``model`` assigns to the response tokens of ``rows``, from one forward and one chunked head pass.

    ``ids`` [R, L, m]: score these ids at each position instead of the sampled token (a teacher's top k, for the
    top-k KL). ``temperature``: of the distribution sampled from. ``with_entropy``: the full-vocabulary entropy.
    ``top_k``: also the model's own k most likely ids and their log-probs. Differentiable wherever autograd is on.
    """
    mask = rows.response_mask.bool()
    hidden = response_hidden_states(model, rows)[mask]
    targets = rows.response_ids[mask][:, None] if ids is None else ids[mask]
    head = model.get_output_embeddings().weight
    scores = head_scores(hidden, head, targets, chunk_size, temperature, with_entropy, top_k)
    if is_sharded(model) and not any(p.requires_grad for p in model.parameters()):
        model.reshard()  # a frozen model's root stays gathered after forward (FSDP2 keeps it for a backward)

    def padded(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        return values.new_zeros(*mask.shape, *values.shape[1:]).index_put((mask,), values)

    logprobs = padded(scores.logprobs)
    return ResponseScores(
        logprobs.squeeze(-1) if ids is None else logprobs,
        padded(scores.entropy),
        padded(scores.topk_ids),
        padded(scores.topk_logprobs),
    )
