"""Per-token log-probs and entropies from hidden states, chunked over tokens.

Qwen2.5-VL's vocabulary has 151,936 entries: the fp32 logits of 8 x 1024
tokens alone take 5 GB, and a naive log_softmax + entropy keeps three such
tensors alive. We never build them for the whole batch. Each chunk of tokens is
projected, reduced to the per-token numbers we need (log p(target), the
log-normaliser and the entropy) and dropped; the backward pass recomputes each
chunk's logits instead of keeping them, so peak memory is one chunk's fp32
logits whatever the batch (two on GPU, where the exponentials get a
chunk-sized buffer too, see ``_block_rows``).

The recomputation is a hand-written autograd Function rather than
``torch.utils.checkpoint``: checkpointing would replay the forward's
full-vocabulary elementwise ops and then autograd through each of them, while
the gradient only needs the chunk's softmax, which the saved log-normaliser
gives in one pass. That keeps forward + backward within reach of the naive
version's time (bench/logprob_entropy.py measures both).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

# Tokens per chunk. At V = 151,936 one fp32 chunk of logits is 0.6 GB at 1024
# tokens (about 4% of what the naive computation holds for 8 x 1024 tokens),
# and large enough that the projection runs at full matmul speed.
DEFAULT_CHUNK_SIZE = 1024

# On CPU the elementwise passes over a chunk's logits run over blocks of rows
# of about this many bytes, so that a block stays in cache across its ~5
# passes instead of streaming the whole chunk from memory for each. On GPU a
# block is the whole chunk: fewer, larger kernels.
_CPU_BLOCK_BYTES = 4 << 20


def _block_rows(logits: torch.Tensor) -> int:
    if logits.device.type != "cpu":
        return max(1, logits.shape[0])
    return max(1, _CPU_BLOCK_BYTES // (logits.element_size() * logits.shape[1]))


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.T`` runs in here: autocast's (bf16-mixed training), else the inputs'."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _project(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T, in the dtype of ``weight``, written into the logits buffer ``out`` (fp32, or fp64)."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == torch.float32:
        return torch.mm(hidden, weight.t(), out=out)
    return out.copy_(hidden @ weight.t())


def _buffers(
    num_tokens: int, chunk_size: int, weight: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A chunk-sized logits buffer, a block-sized one for exponentials, and the block's row count.

    Reused across chunks, so the allocator does not map and fault in fresh
    pages of vocabulary width for every chunk.
    """
    logits = torch.empty(min(chunk_size, num_tokens), weight.shape[0], dtype=dtype, device=weight.device)
    block = _block_rows(logits)
    exps = torch.empty(min(block, logits.shape[0]), weight.shape[0], dtype=dtype, device=weight.device)
    return logits, exps, block


def _logit_chunks(
    hidden: torch.Tensor, head: torch.Tensor, chunk_size: int, temperature: float, dtype: torch.dtype
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, Iterator[tuple[slice, torch.Tensor, torch.Tensor]]]]:
    """(tokens, their hidden states in the head's dtype, their logits, the logits' blocks) chunk by chunk.

    The logits are ``hidden @ head.T`` in ``dtype``, written into one buffer
    reused by every chunk: finish with a chunk, blocks included, before taking
    the next. Each block is (its tokens, its logits divided by ``temperature``
    in place, an exponentials buffer of its size); the division happens as the
    block is taken, so that the block is still in cache for what follows.
    """
    num_tokens = hidden.shape[0]
    logits, exps, block = _buffers(num_tokens, chunk_size, head, dtype)
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        h = hidden[start:stop].to(head.dtype)
        chunk = _project(h, head, logits[: stop - start])
        yield slice(start, stop), h, chunk, _logit_blocks(chunk, start, block, temperature, exps)


def _logit_blocks(
    chunk: torch.Tensor, start: int, block: int, temperature: float, exps: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    for offset in range(0, chunk.shape[0], block):
        z = chunk[offset : offset + block]
        if temperature != 1.0:
            z.div_(temperature)
        yield slice(start + offset, start + offset + z.shape[0]), z, exps[: z.shape[0]]


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    """log p(ids[n, j]) for k ids per token, the entropy H(p) per token, p = softmax(hidden @ weight.T / T), and
    optionally p's own ``top_k`` ids and log-probs per token (no gradient: a teacher's scores).

    ``token_logprobs_and_entropy`` takes one id per token (the target), the
    distillation loss the teacher's top k. Saved for backward: the inputs, the
    ids and two (N,) vectors (log-normaliser, entropy); nothing of vocabulary
    size. The matmuls run in ``matmul_dtype`` (autocast is switched off inside
    and applied by hand, so that the backward pass recomputes exactly the
    forward's logits); everything else in ``dtype`` (fp32, or fp64 for gradcheck).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        ids: torch.Tensor,
        chunk_size: int,
        temperature: float,
        with_entropy: bool,
        matmul_dtype: torch.dtype,
        dtype: torch.dtype,
        top_k: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(hidden.device.type, enabled=False):
            num_tokens = hidden.shape[0]
            head = weight.to(matmul_dtype)  # cast once, not per chunk
            logprobs = torch.empty(ids.shape, dtype=dtype, device=hidden.device)
            log_normaliser = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
            entropy = torch.empty(num_tokens if with_entropy else 0, dtype=dtype, device=hidden.device)
            topk_ids = torch.empty(num_tokens if top_k else 0, top_k, dtype=torch.int32, device=hidden.device)
            topk_logprobs = torch.empty(topk_ids.shape, dtype=dtype, device=hidden.device)
            for _, _, _, blocks in _logit_chunks(hidden, head, chunk_size, temperature, dtype):
                for rows, shifted, exps in blocks:
                    # Work relative to the row max: exp cannot overflow, and the entropy
                    # log(s) - E[z - max] does not cancel two large numbers.
                    row_max = shifted.amax(dim=-1, keepdim=True)
                    shifted.sub_(row_max)
                    unnormalised = torch.exp(shifted, out=exps)
                    sum_exp = unnormalised.sum(dim=-1)
                    log_sum = sum_exp.log()
                    log_normaliser[rows] = row_max.squeeze(-1) + log_sum
                    logprobs[rows] = shifted.gather(-1, ids[rows]) - log_sum[:, None]
                    if with_entropy:
                        entropy[rows] = log_sum - torch.linalg.vecdot(unnormalised, shifted) / sum_exp
                    if top_k:
                        top = shifted.topk(top_k, dim=-1)
                        topk_ids[rows] = top.indices.to(torch.int32)
                        topk_logprobs[rows] = top.values - log_sum[:, None]
        ctx.save_for_backward(hidden, weight, ids, log_normaliser, entropy)
        ctx.chunk_size, ctx.temperature, ctx.with_entropy = chunk_size, temperature, with_entropy
        ctx.matmul_dtype, ctx.device_type = matmul_dtype, hidden.device.type
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) arrives as None: skip its work
        ctx.mark_non_differentiable(topk_ids, topk_logprobs)
        return logprobs, entropy, topk_ids, topk_logprobs

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_topk
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, ids, log_normaliser, entropy = ctx.saved_tensors
        nothing = (None,) * 9  # one per input of forward
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_entropy = None  # the (0,) placeholder output carries no gradient
        if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return nothing
        with torch.autocast(ctx.device_type, enabled=False):
            head = weight.to(ctx.matmul_dtype)
            temperature = ctx.temperature
            # With G the gradient of the log-probs at the ids and g_H that of the entropy, the
            # logits' gradient is scatter(G) - p * (sum_j G_j + g_H (log p + H)), from
            # d log p_i / dz = onehot_i - p and dH / dz = -p (log p + H): one pass per block.
            row_sums = grad_logprobs.sum(dim=-1) if grad_logprobs is not None else None
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
            grad_weight = torch.zeros_like(weight) if need_weight else None
            chunks = _logit_chunks(hidden, head, ctx.chunk_size, temperature, log_normaliser.dtype)
            for tokens, h, chunk, blocks in chunks:  # chunk is overwritten, block by block, by dloss/dz
                for rows, logp, exps in blocks:
                    logp.sub_(log_normaliser[rows, None])
                    probs = torch.exp(logp, out=exps)
                    if grad_entropy is not None:
                        logp.add_(entropy[rows, None]).mul_(grad_entropy[rows, None])
                        if row_sums is not None:
                            logp.add_(row_sums[rows, None])
                        logp.mul_(probs).neg_()
                    else:
                        torch.mul(probs, row_sums[rows, None].neg(), out=logp)
                    if grad_logprobs is not None:
                        logp.scatter_add_(-1, ids[rows], grad_logprobs[rows].to(logp.dtype))
                grad_chunk = chunk.to(head.dtype)
                if grad_hidden is not None:
                    if grad_hidden.dtype == head.dtype:
                        torch.mm(grad_chunk, head, out=grad_hidden[tokens])
                    else:
                        grad_hidden[tokens] = grad_chunk @ head
                if grad_weight is not None:
                    if grad_weight.dtype == head.dtype:
                        grad_weight.addmm_(grad_chunk.t(), h)  # accumulate in place: no (V, H) temporary per chunk
                    else:  # bf16 products summed in the weight's dtype, as autocast's cast-back would
                        grad_weight.add_(grad_chunk.t() @ h)
                del grad_chunk  # before the next chunk's projection, which allocates its own chunk-sized result
            if temperature != 1.0:  # z = logits / T: scale the (N, H) and (V, H) results, not every (chunk, V)
                for grad in (grad_hidden, grad_weight):
                    if grad is not None:
                        grad.div_(temperature)
        return (grad_hidden, grad_weight) + nothing[2:]


def _check_hidden_and_head(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {shapes}")


def _check_chunking(chunk_size: int, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


class HeadScores(NamedTuple):
    """What one chunked pass over the vocabulary gives per token (see ``head_scores``)."""

    logprobs: torch.Tensor  # (N, m): log p of each token's m ids
    entropy: torch.Tensor | None  # (N,) full-vocabulary entropy
    topk_ids: torch.Tensor | None  # int32 (N, k): p's own most likely ids, in descending order
    topk_logprobs: torch.Tensor | None  # (N, k): their log-probs


def head_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    with_entropy: bool = False,
    top_k: int = 0,
    dtype: torch.dtype = torch.float32,
) -> HeadScores:
    """Everything the project reads off p = softmax(hidden @ weight.T / temperature), in one chunked pass.

    ``hidden`` (N, H), the head ``weight`` (V, H), ``ids`` (N, m): the ids whose log-probs to return (the sampled
    token, m = 1; a teacher's top k). ``with_entropy``: the exact full-vocabulary entropy per token. ``top_k``:
    also p's own k most likely ids and their log-probs (no gradient). The log-probs and the entropy are
    differentiable w.r.t. ``hidden`` and ``weight``; logits are held for at most ``chunk_size`` tokens and
    recomputed chunk by chunk in backward. Under autocast the projection runs in autocast's dtype; the rest in
    ``dtype`` (fp32; fp64 for references and gradcheck).
    """
    _check_hidden_and_head(hidden, weight)
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected ids of shape ({hidden.shape[0]}, m), got {tuple(ids.shape)}")
    _check_chunking(chunk_size, temperature)
    if not 0 <= top_k <= weight.shape[0]:
        raise ValueError(f"top_k must be in [0, {weight.shape[0]}] (the vocabulary), got {top_k}")
    logprobs, entropy, topk_ids, topk_logprobs = _ChunkedLogprobsEntropy.apply(
        hidden, weight, ids.long(), chunk_size, float(temperature), with_entropy, _matmul_dtype(hidden, weight), dtype,
        top_k,
    )  # fmt: skip
    if not top_k:
        topk_ids = topk_logprobs = None
    return HeadScores(logprobs, entropy if with_entropy else None, topk_ids, topk_logprobs)


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(target) and full-vocabulary entropy under softmax(hidden @ weight.T / temperature).

    ``hidden`` (N, H) and ``weight`` (V, H) are the last hidden states and the
    output head (the matmul runs in their dtype, everything after it in fp32),
    ``targets`` (N,) are token ids. Returns
    ``(logprobs, entropy)``, both (N,) fp32; ``entropy`` is None when
    ``with_entropy`` is False. The entropy is exact, -sum_v p_v log p_v over the
    whole vocabulary, not the one-sample estimate -log p(target).

    Under autocast (bf16-mixed training) the projection runs in autocast's
    dtype, as ``hidden @ weight.T`` would; gradients come back in the dtypes of
    ``hidden`` and ``weight``.

    Pass the sampling temperature when scoring responses sampled at T != 1, so
    that log-probs and entropy are those of the distribution sampled from.
    Both outputs are differentiable with respect to ``hidden`` and ``weight``;
    logits are never held for more than ``chunk_size`` tokens, and the backward
    pass recomputes them chunk by chunk. The result does not depend on
    ``chunk_size`` beyond float rounding.
    """
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    scores = head_scores(hidden, weight, targets[:, None], chunk_size, temperature, with_entropy)
    return scores.logprobs.squeeze(-1), scores.entropy


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (N, H) under the head ``weight`` (V, H); returns (N,) fp32."""
    logprobs, _ = token_logprobs_and_entropy(hidden, weight, targets, chunk_size, False, temperature)
    return logprobs
