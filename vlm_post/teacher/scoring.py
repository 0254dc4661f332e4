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
from vlm_post.models.loading import Dtype, check_image_text_to_text, load_policy, load_processor, resolve_model_path
from vlm_post.models.logprobs import batch_logprobs
from vlm_post.rollout.batch import ModelRows
from vlm_post.teacher.cache import TeacherBatch
from vlm_post.teacher.fingerprint import TeacherFingerprint, fingerprint_teacher, local_model_dir

# Image preprocessing settings that change the pixel rows or the number of image tokens.
_IMAGE_SETTINGS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


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
    def score(self, rows: ModelRows) -> TeacherBatch:
        """Scores of the response positions of one (micro-)batch of prompt + response rows, on the rows' device in
        fp32: the top-k ids and log-probs and the sampled token's log-prob, zero where ``rows.response_mask`` is 0."""
        if self.model is None:
            raise RuntimeError("HFTeacher.score before load()")
        scores = batch_logprobs(self.model, rows, top_k=self.top_k, chunk_size=self.chunk_size)
        return TeacherBatch(scores.topk_ids, scores.topk_logprobs, scores.logprobs, rows.response_mask.bool())
