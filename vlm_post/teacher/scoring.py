"""The teacher's side of on-policy distillation: score the student's own tokens.

For every response position the teacher reports its top-k token ids and
log-probs, and the log-prob of the token the student actually sampled. That is
all both distillation losses need (``vlm_post.losses.distill``), and it is what
the teacher-logit cache stores, so a teacher can score in-process or in a
separate process (``tools/score_teacher.py``) on other GPUs.

The teacher reads the very same model inputs as the student (prompt + response
ids, pixel values, ``mm_token_type_ids``), so student and teacher must share a
tokenizer and an image preprocessing: ``check_teacher_compatible`` refuses a
teacher that does not, naming the first difference.

With ``n`` responses per prompt the teacher runs each distinct prompt once
(``vlm_post.models.forward.response_hidden_states``), as the student does.

``HFTeacher.fingerprint`` names the teacher and its scoring settings for the
cache (``vlm_post.teacher.fingerprint``), the same in-process and in the
external scorer.
"""

from __future__ import annotations

import torch

from vlm_post.errors import ConfigError
from vlm_post.losses.logprobs import DEFAULT_CHUNK_SIZE
from vlm_post.models.forward import response_hidden_states
from vlm_post.models.loading import Dtype, check_image_text_to_text, load_policy, load_processor, resolve_model_path
from vlm_post.models.sharding import is_sharded
from vlm_post.rollout.batch import ModelRows
from vlm_post.teacher.fingerprint import TeacherFingerprint, fingerprint_teacher, local_model_dir

# Image preprocessing settings that change the pixel rows or the number of image tokens.
_IMAGE_SETTINGS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


@torch.no_grad()
def topk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids (int32, [N, k]), their log-probs and the targets' log-probs (fp32) from hidden states [N, H].

    Chunked over tokens, like the training losses: one chunk's fp32 logits at a time, and no second tensor of
    that size (the ids and values are read off the raw logits, then the normaliser is taken in place).
    """
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top_k must be in [1, {weight.shape[0]}] (the vocabulary), got {k}")
    ids = torch.empty(hidden.shape[0], k, dtype=torch.int32, device=hidden.device)
    values = torch.empty(hidden.shape[0], k, dtype=torch.float32, device=hidden.device)
    sampled = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(hidden.shape[0], start + chunk_size)
        logits = (hidden[start:end] @ weight.t()).float()
        top = logits.topk(k, dim=-1)
        picked = logits.gather(-1, targets[start:end, None].long()).squeeze(-1)
        peak = logits.amax(-1, keepdim=True)
        normaliser = logits.sub_(peak).exp_().sum(-1).log_() + peak.squeeze(-1)  # logsumexp, in place
        ids[start:end] = top.indices.to(torch.int32)
        values[start:end] = top.values - normaliser[:, None]
        sampled[start:end] = picked - normaliser
    return ids, values, sampled


def check_teacher_compatible(student_processor, teacher_processor, teacher_path: str) -> None:
    """The teacher must read the student's token ids and pixel rows as the student does."""
    student_vocab, teacher_vocab = student_processor.tokenizer.get_vocab(), teacher_processor.tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])[:1]
        raise ConfigError(
            f"teacher {teacher_path}: its tokenizer differs from the student's ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens, first difference {differing}); distillation scores the student's "
            "token ids, so both must use the same tokenizer"
        )
    for name in _IMAGE_SETTINGS:
        ours = getattr(student_processor.image_processor, name, None)
        theirs = getattr(teacher_processor.image_processor, name, None)
        if ours != theirs:
            raise ConfigError(
                f"teacher {teacher_path}: image processor {name}={theirs!r}, the student's is {ours!r}; the teacher "
                "must see the same image tokens as the student"
            )


class HFTeacher:
    """An in-process teacher: any image-text-to-text model, frozen, scoring in micro-batches."""

    def __init__(
        self,
        model_name_or_path: str,
        student_processor,
        top_k: int,
        dtype: Dtype = "auto",
        attn_implementation: str | None = "sdpa",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.path = resolve_model_path(model_name_or_path)
        check_image_text_to_text(self.path)
        self.processor = load_processor(self.path)
        check_teacher_compatible(student_processor, self.processor, self.path)
        self.top_k, self.chunk_size = top_k, chunk_size
        self.dtype, self.attn_implementation = dtype, attn_implementation
        self.model: torch.nn.Module | None = None

    def fingerprint(self, cache_dtype: str) -> TeacherFingerprint:
        """This teacher's fingerprint, scoring at its ``top_k`` and ``dtype`` into a ``cache_dtype`` cache."""
        return fingerprint_teacher(local_model_dir(self.path), top_k=self.top_k, cache_dtype=cache_dtype,
                                   dtype=self.dtype, source=self.path)  # fmt: skip

    def load(self, device: torch.device | str) -> HFTeacher:
        if self.model is None:
            self.model = load_policy(self.path, self.dtype, self.attn_implementation).eval().requires_grad_(False)
        self.model.to(device)
        return self

    @torch.no_grad()
    def score(self, rows: ModelRows) -> dict[str, torch.Tensor]:
        """Scores of the response positions of one (micro-)batch of prompt + response rows.

        Returns ``topk_ids`` (int32, [R, L, k]), ``topk_logprobs`` ([R, L, k]) and ``sampled_logprobs``
        ([R, L]), fp32, zero where ``rows.response_mask`` is 0.
        """
        if self.model is None:
            raise RuntimeError("HFTeacher.score before load()")
        length, mask = rows.response_mask.shape[1], rows.response_mask.bool()
        hidden = response_hidden_states(self.model, rows)
        predicting = hidden[mask]
        targets = rows.response_ids[mask]
        weight = self.model.get_output_embeddings().weight
        ids, values, sampled = topk_logprobs(predicting, weight, targets, self.top_k, self.chunk_size)
        if is_sharded(self.model):
            self.model.reshard()  # FSDP2 keeps the root gathered after forward, for a backward the teacher never runs
        rows, k = mask.shape[0], self.top_k
        out_ids = torch.zeros(rows, length, k, dtype=torch.int32, device=hidden.device)
        out_values = torch.zeros(rows, length, k, dtype=torch.float32, device=hidden.device)
        out_sampled = torch.zeros(rows, length, dtype=torch.float32, device=hidden.device)
        out_ids[mask], out_values[mask], out_sampled[mask] = ids, values, sampled
        return {"topk_ids": out_ids, "topk_logprobs": out_values, "sampled_logprobs": out_sampled}
