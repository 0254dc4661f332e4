"""Losses for on-policy distillation (OPD): the student samples, the teacher scores every sampled position.

The objective is the per-token reverse KL, KL(student || teacher), over the
student's own samples. Two ways to train on it (docs/distillation.md compares
them):

(a) ``topk_reverse_kl*``: a differentiable KL per position over a (k+1)-outcome
    coarsening of both distributions: the teacher's top-k token ids, plus one
    "tail" bucket holding everything else. Needs the teacher's top-k ids and
    log-probs per position (a cache of int32 ids and fp16/bf16 log-probs). It is
    the exact KL between the coarsened distributions, so its only bias is the
    coarsening; with k = V it is the full KL.
(b) ``sampled_reverse_kl_*``: the one-sample estimate log pi_s(y) - log pi_t(y)
    at the sampled token y, used as a (negative) per-token reward in a
    policy-gradient loss. Needs only the teacher's log-prob of the sampled
    token. Unbiased for the gradient, higher variance; a discount turns it into
    a sequence-level credit.

Everything here is pure torch. ``topk_reverse_kl_from_hidden`` works from the
last hidden states and the output head like ``token_logprobs_and_entropy``:
chunked over tokens, nothing of shape (tokens, V) kept for backward.
"""

from __future__ import annotations

import math

import torch

from vlm_post.losses.grpo import Aggregation, aggregate
from vlm_post.losses.kl import LOG_RATIO_CLAMP
from vlm_post.losses.logprobs import DEFAULT_CHUNK_SIZE, _matmul_dtype, head_scores

# Floor of the teacher's tail mass. The tail is 1 - sum(exp(top-k log-probs)),
# and with fp16/bf16 log-probs that sum is only good to ~1e-3, so a tail of 0 (or
# below) means "negligible", not "impossible": flooring keeps log q(tail) finite
# (KL(p || q) is +inf for q = 0) while still charging the student
# p(tail) * (log p(tail) + 13.8) for mass the teacher does not put there.
TAIL_FLOOR = 1e-6


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the math after the projection, fp64 when the inputs are fp64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_topk(topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor | None) -> None:
    if topk_ids.shape != teacher_topk_logprobs.shape or topk_ids.dim() < 1:
        shapes = f"{tuple(topk_ids.shape)} and {tuple(teacher_topk_logprobs.shape)}"
        raise ValueError(f"expected topk_ids and teacher_topk_logprobs of one (..., k) shape, got {shapes}")
    if mask is not None and mask.shape != topk_ids.shape[:-1]:
        raise ValueError(f"expected a mask of shape {tuple(topk_ids.shape[:-1])}, got {tuple(mask.shape)}")


def coarsened_reverse_kl(
    student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p || q) over the k+1 outcomes {top-k ids, tail}, from both sides' log-probs at the ids (..., k).

    p(tail) = 1 - sum_i p(i), q(tail) likewise, and
    KL = sum_i p(i) (log p(i) - log q(i)) + p(tail) (log p(tail) - log q(tail)),
    the exact KL of the coarsened distributions (a lower bound of the full KL).
    The ids must be distinct within a position and the log-probs finite; the
    teacher's may be fp16/bf16. A teacher top-k mass above 1 (rounding) is
    renormalised to 1; q(tail) is floored at ``TAIL_FLOOR``; an empty student
    tail contributes 0 (0 log 0 = 0). Differentiable in the student's
    log-probs. Returns (...,) in fp32 (fp64 for fp64 inputs); positions where
    ``mask`` (...,) is False get 0 and no gradient, whatever they hold.
    """
    _check_topk(student_topk_logprobs, teacher_topk_logprobs, mask)
    dtype = _compute_dtype(student_topk_logprobs.dtype)
    with torch.autocast(student_topk_logprobs.device.type, enabled=False):
        student = student_topk_logprobs.to(dtype)
        teacher = teacher_topk_logprobs.to(dtype)
        if mask is not None:  # padding may hold nan or -inf: put a finite placeholder there
            valid = mask.bool()[..., None]
            placeholder = torch.full((), -math.log(student.shape[-1] + 1), dtype=dtype, device=student.device)
            student, teacher = torch.where(valid, student, placeholder), torch.where(valid, teacher, placeholder)
        teacher_mass = torch.logsumexp(teacher, dim=-1)
        teacher = teacher - teacher_mass.clamp(min=0.0)[..., None]
        # -expm1(log m) = 1 - m, without cancellation when m is close to 1
        log_teacher_tail = (-torch.expm1(teacher_mass.clamp(max=0.0))).clamp(min=TAIL_FLOOR).log()
        student_tail = -torch.expm1(torch.logsumexp(student, dim=-1).clamp(max=0.0))
        log_student_tail = student_tail.clamp(min=torch.finfo(dtype).tiny).log()  # finite; times p(tail) = 0
        kl = (student.exp() * (student - teacher)).sum(dim=-1) + student_tail * (log_student_tail - log_teacher_tail)
        if mask is not None:
            kl = torch.where(mask.bool(), kl, torch.zeros((), dtype=dtype, device=kl.device))
    return kl


def topk_reverse_kl(
    student_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference top-k reverse KL from the student's full log-probs (..., V); returns (...,).

    Gathers the student's log-probs at the teacher's ``topk_ids`` (..., k) and
    applies ``coarsened_reverse_kl``. Holds (..., V) log-probs: for tests and
    small vocabularies; use ``topk_reverse_kl_from_hidden`` for real models.
    """
    _check_topk(topk_ids, teacher_topk_logprobs, mask)
    ids = topk_ids.long()
    if mask is not None:
        ids = torch.where(mask.bool()[..., None], ids, 0)  # padding ids may be out of range
    return coarsened_reverse_kl(student_logprobs.gather(-1, ids), teacher_topk_logprobs, mask)


def topk_reverse_kl_and_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token top-k reverse KL and the student's full entropy, from hidden states; returns ((N,), (N,) | None).

    The student is softmax(hidden @ weight.T / temperature) with ``hidden``
    (N, H) and the output head ``weight`` (V, H); ``topk_ids`` (N, k) and
    ``teacher_topk_logprobs`` (N, k) come from the teacher (pass the sampling
    temperature so the student is the distribution it sampled from). The KL is
    ``coarsened_reverse_kl`` of the student's log-probs at the ids; rows where
    ``mask`` (N,) is False get KL 0 and no KL gradient, and their ids may be
    anything. The entropy is the exact full-vocabulary one, for every row (a
    metric or an entropy bonus; None when ``with_entropy`` is False).

    Both outputs are differentiable w.r.t. ``hidden`` and ``weight``; logits are
    held for at most ``chunk_size`` tokens and recomputed in backward. Outputs
    are fp32 (fp64 for fp64 inputs); under autocast the projection runs in
    autocast's dtype, as in ``token_logprobs_and_entropy``.
    """
    _check_topk(topk_ids, teacher_topk_logprobs, mask)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected topk_ids of shape ({hidden.shape[0]}, k), got {tuple(topk_ids.shape)}")
    ids = topk_ids.long()
    if mask is not None:
        ids = torch.where(mask.bool()[:, None], ids, 0)
    dtype = _compute_dtype(_matmul_dtype(hidden, weight))
    student = head_scores(hidden, weight, ids, chunk_size, temperature, with_entropy, dtype=dtype)
    return coarsened_reverse_kl(student.logprobs, teacher_topk_logprobs, mask), student.entropy


def topk_reverse_kl_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token top-k reverse KL (N,) from hidden states; see ``topk_reverse_kl_and_entropy_from_hidden``."""
    kl, _ = topk_reverse_kl_and_entropy_from_hidden(
        hidden, weight, topk_ids, teacher_topk_logprobs, chunk_size, temperature, mask, with_entropy=False
    )
    return kl


def topk_entropy(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of the (k+1)-outcome coarsening {top-k, tail} from top-k log-probs (..., k); returns (...,).

    An approximation of the full entropy, for metrics (e.g. of the teacher,
    whose full distribution is not cached): it is a lower bound, short of the
    full entropy by q(tail) times the entropy within the tail, which is at most
    q(tail) log(V - k). Exact for k = V. Mass above 1 (fp16/bf16 rounding) is
    renormalised; an empty tail contributes 0; -inf entries (fewer than k
    candidates) contribute 0. No gradient.
    """
    with torch.no_grad():
        logprobs = topk_logprobs.to(_compute_dtype(topk_logprobs.dtype))
        mass = torch.logsumexp(logprobs, dim=-1)
        logprobs = logprobs - mass.clamp(min=0.0)[..., None]
        tail = -torch.expm1(mass.clamp(max=0.0))
        probs = logprobs.exp()
        head = torch.where(probs > 0, probs * logprobs, 0.0).sum(dim=-1)
        return -head - tail * tail.clamp(min=torch.finfo(tail.dtype).tiny).log()


def _suffix_discounted_sum(values: torch.Tensor, valid: torch.Tensor, discount: float) -> torch.Tensor:
    """out_t = sum over valid t' >= t of discount^n(t, t') values_t', n(t, t') = valid tokens in [t, t').

    The discount counts valid tokens (the student's actions) only, so masked
    holes (e.g. tool outputs between turns) neither decay nor add. The
    recursion r_t = x_t + a_t r_{t+1}, a_t = discount on valid tokens and 1
    elsewhere, is solved as a log2(L)-step doubling scan over (a, x) pairs,
    rather than a Python loop over L or a discount^-t rescaled cumsum, which
    overflows for long responses; products of a only shrink, so nothing
    overflows here.
    """
    x = torch.where(valid, values, 0.0)
    a = torch.where(valid, torch.full_like(values, discount), torch.ones_like(values))
    length, shift = values.shape[-1], 1
    while shift < length:
        x_next = torch.nn.functional.pad(x[:, shift:], (0, shift))
        a_next = torch.nn.functional.pad(a[:, shift:], (0, shift))
        x, a = x + a * x_next, a * a_next
        shift *= 2
    return x


def sampled_reverse_kl_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    discount: float = 0.0,
) -> torch.Tensor:
    """Per-token advantages (rows, L) from the sampled-token reverse-KL estimate; no gradient.

    With d_t = log pi_s(y_t) - log pi_t(y_t) at the student's sampled tokens y_t
    (an unbiased one-sample estimate of the position's KL(pi_s || pi_t)):
    A_t = -sum_{t' >= t} discount^(t' - t) d_t' over valid tokens, t' - t
    counted in valid tokens. ``discount`` 0: A_t = -d_t (per token, Tinker's
    default); 1: minus the reverse KL-to-go, whose policy gradient is that of
    the sequence-level KL. Masked positions get 0 (and may hold nan or -inf);
    the teacher's log-probs may be fp16/bf16. fp32 (fp64 for fp64 inputs).
    """
    shape = student_logprobs.shape
    if student_logprobs.dim() != 2 or teacher_logprobs.shape != shape or mask.shape != shape:
        shapes = f"{tuple(shape)}, {tuple(teacher_logprobs.shape)}, {tuple(mask.shape)}"
        raise ValueError(f"expected student_logprobs, teacher_logprobs and mask of one (rows, L) shape, got {shapes}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    with torch.no_grad():
        valid = mask.bool()
        dtype = _compute_dtype(student_logprobs.dtype)
        sample_kl = torch.where(valid, student_logprobs.to(dtype) - teacher_logprobs.to(dtype), 0.0)
        if discount > 0.0:  # the scan carries sums through masked holes: zero them again
            sample_kl = torch.where(valid, _suffix_discounted_sum(sample_kl, valid, discount), 0.0)
        return -sample_kl


def sampled_reverse_kl_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    discount: float = 0.0,
    aggregation: Aggregation = "token-mean",
    max_response_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss on the sampled-token reverse KL; returns (loss, stats).

    ``logprobs`` (rows, L) are the trained student's log-probs of the sampled
    tokens (differentiable), ``old_logprobs`` those of the policy that sampled
    them, ``teacher_logprobs`` the teacher's. Per token, with
    rho = exp(logprobs - old_logprobs) (value 1 on-policy, but it carries the
    gradient) and A from ``sampled_reverse_kl_advantages`` of the *current*
    log-probs (detached): loss = aggregate(-A rho). Its gradient has mean
    E_old[rho (log pi_s - log pi_t) grad log pi_s] = grad KL(pi_s || pi_t) per
    position (discount 0), also when old != current, since the importance
    weight corrects for the sampler; no PPO clipping. ``aggregation`` and
    ``max_response_length`` as in ``aggregate``.

    Stats (detached): ``reverse_kl`` (token mean of d_t), ``sequence_reverse_kl``
    (mean over rows with tokens of the sum of d_t), ``advantage_mean`` (token
    mean), ``ratio_mean``, ``pg_loss``.
    """
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape:
        shapes = f"{tuple(logprobs.shape)} and {tuple(old_logprobs.shape)}"
        raise ValueError(f"expected logprobs and old_logprobs of one (rows, L) shape, got {shapes}")
    advantages = sampled_reverse_kl_advantages(logprobs.detach(), teacher_logprobs, mask, discount)
    valid = mask.bool()
    # masked positions may hold nan or inf: keep them out of exp, whose backward would meet 0 * nan; the clamp keeps
    # exp from overflowing
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss = aggregate(-advantages.to(ratio.dtype) * ratio, mask, aggregation, max_response_length)

    with torch.no_grad():
        dtype = advantages.dtype
        sample_kl = torch.where(valid, logprobs.to(dtype) - teacher_logprobs.to(dtype), 0.0)
        num_valid = valid.sum().clamp(min=1)
        rows_with_tokens = valid.any(dim=-1).sum().clamp(min=1)
        stats = {
            "reverse_kl": sample_kl.sum() / num_valid,
            "sequence_reverse_kl": sample_kl.sum() / rows_with_tokens,
            "advantage_mean": advantages.sum() / num_valid,
            "ratio_mean": torch.where(valid, ratio, 0.0).sum() / num_valid,
            "pg_loss": loss.detach(),
        }
    return loss, stats
