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

With ``n`` responses per prompt the rows come as runs of copies of one prompt.
For the models whose positions we know how to carry over (Qwen2-VL, Qwen2.5-VL,
as in the rollout engine) the teacher then runs each distinct prompt once (its
image included), repeats its KV cache over the prompt's rows and runs only the
responses on top: the same scores (up to float rounding) for about n times less
prompt work. Rows whose prompts all differ take the plain full forward.
"""

from __future__ import annotations

import inspect

import torch

from vlm_post.errors import ConfigError
from vlm_post.losses.logprobs import DEFAULT_CHUNK_SIZE
from vlm_post.models.forward import decoder_hidden_states
from vlm_post.models.loading import Dtype, check_image_text_to_text, load_policy, load_processor, resolve_model_path
from vlm_post.rollout.hf import PER_TOKEN_KEYS, SHARED_PREFILL_MODEL_TYPES

# Image preprocessing settings that change the pixel rows or the number of image tokens.
_IMAGE_SETTINGS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


@torch.no_grad()
def topk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids (int32, [N, k]), their log-probs and the targets' log-probs (fp32) from hidden states [N, H].

    Chunked over tokens, like the training losses: one chunk's fp32 logits at a time.
    """
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top_k must be in [1, {weight.shape[0]}] (the vocabulary), got {k}")
    ids = torch.empty(hidden.shape[0], k, dtype=torch.int32, device=hidden.device)
    values = torch.empty(hidden.shape[0], k, dtype=torch.float32, device=hidden.device)
    sampled = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(hidden.shape[0], start + chunk_size)
        logprobs = torch.log_softmax((hidden[start:end] @ weight.t()).float(), dim=-1)
        top = logprobs.topk(k, dim=-1)
        ids[start:end], values[start:end] = top.indices.to(torch.int32), top.values
        sampled[start:end] = logprobs.gather(-1, targets[start:end, None].long()).squeeze(-1)
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

    def load(self, device: torch.device | str) -> HFTeacher:
        if self.model is None:
            self.model = load_policy(self.path, self.dtype, self.attn_implementation).eval().requires_grad_(False)
        self.model.to(device)
        return self

    @torch.no_grad()
    def score(self, inputs: dict, prompt_width: int, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores of the response positions of one (micro-)batch of prompt + response rows.

        Returns ``topk_ids`` (int32, [R, L, k]), ``topk_logprobs`` ([R, L, k]) and ``sampled_logprobs``
        ([R, L]), fp32, zero where ``response_mask`` is 0.
        """
        if self.model is None:
            raise RuntimeError("HFTeacher.score before load()")
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        length, mask = response_mask.shape[1], response_mask.bool()
        groups = self._prompt_groups(inputs, prompt_width)
        if groups is not None:
            hidden = self._shared_prompt_hidden(inputs, prompt_width, length, *groups)
            predicting = hidden[mask]
        else:
            hidden = decoder_hidden_states(self.model, inputs)
            predicting = hidden[:, prompt_width - 1 : prompt_width - 1 + length][mask]
        targets = inputs["input_ids"][:, prompt_width : prompt_width + length][mask]
        weight = self.model.get_output_embeddings().weight
        ids, values, sampled = topk_logprobs(predicting, weight, targets, self.top_k, self.chunk_size)
        rows, k = mask.shape[0], self.top_k
        out_ids = torch.zeros(rows, length, k, dtype=torch.int32, device=hidden.device)
        out_values = torch.zeros(rows, length, k, dtype=torch.float32, device=hidden.device)
        out_sampled = torch.zeros(rows, length, dtype=torch.float32, device=hidden.device)
        out_ids[mask], out_values[mask], out_sampled[mask] = ids, values, sampled
        return {"topk_ids": out_ids, "topk_logprobs": out_values, "sampled_logprobs": out_sampled}

    # --- rows that share a prompt: run the prompt once ---------------------------------------------

    def _prompt_groups(self, inputs: dict, prompt_width: int) -> tuple[list[int], torch.Tensor] | None:
        """(first row of each distinct prompt, index of each row's prompt among them) when some consecutive
        rows share their prompt (ids, per-token inputs and pixel rows) and the shared forward applies; else None."""
        model, ids = self.model, inputs["input_ids"]
        base = getattr(model, "model", None)
        if model.config.model_type not in SHARED_PREFILL_MODEL_TYPES or not hasattr(base, "rope_deltas"):
            return None
        rows = ids.shape[0]
        if rows < 2 or prompt_width < 1 or not bool(inputs["attention_mask"][:, prompt_width - 1].all()):
            return None  # the prompts must be left-padded: the prompt's last column is every row's last prompt token
        known = set(PER_TOKEN_KEYS) | {"pixel_values", "image_grid_thw", "labels", "image_source"}
        if any(key not in known for key, value in inputs.items() if isinstance(value, torch.Tensor)):
            return None  # an input we would not know how to cut and repeat (videos, ...)
        token_types = inputs.get("mm_token_type_ids")
        if token_types is not None and bool(token_types[:, prompt_width - 1].any()):
            return None
        pixels = self._row_pixels(inputs, prompt_width)
        if pixels is None:
            return None
        per_token = [inputs[key][:, :prompt_width] for key in PER_TOKEN_KEYS if key in inputs]
        leaders, group = [0], [0]
        for row in range(1, rows):
            same = all(torch.equal(value[row], value[row - 1]) for value in per_token) and _same_rows(
                pixels[row], pixels[row - 1]
            )
            if not same:
                leaders.append(row)
            group.append(len(leaders) - 1)
        if len(leaders) == rows:
            return None
        return leaders, torch.tensor(group, device=ids.device)

    def _row_pixels(self, inputs: dict, prompt_width: int) -> list[tuple] | None:
        """Per row, its images' (grid, pixel rows), in order; None when the image tokens do not add up."""
        rows = inputs["input_ids"].shape[0]
        if "image_grid_thw" not in inputs:
            return [() for _ in range(rows)]
        config = self.model.config
        merge = config.vision_config.spatial_merge_size
        grids = inputs["image_grid_thw"]
        tokens_per_image = (grids.prod(-1) // merge**2).tolist()
        patch_starts = [0] + grids.prod(-1).cumsum(0).tolist()
        tokens_per_row = (inputs["input_ids"][:, :prompt_width] == config.image_token_id).sum(-1).tolist()
        out, image = [], 0
        for wanted in tokens_per_row:
            mine = []
            while wanted > 0 and image < len(tokens_per_image):
                wanted -= tokens_per_image[image]
                mine.append(image)
                image += 1
            if wanted != 0:
                return None
            out.append(tuple(mine))
        if image != len(tokens_per_image):
            return None
        pixel_values = inputs["pixel_values"]
        return [
            tuple((grids[i], pixel_values[patch_starts[i] : patch_starts[i + 1]]) for i in images) for images in out
        ]

    def _shared_prompt_hidden(
        self, inputs: dict, prompt_width: int, length: int, leaders: list[int], group: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [R, length, H], entry j predicting response token j: each distinct prompt runs once,
        its KV cache is repeated over its rows, then the responses run on top (positions as in ``generate``)."""
        from transformers import DynamicCache

        model = self.model
        base = model.model
        cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        prompt = {key: inputs[key][leaders, :prompt_width] for key in PER_TOKEN_KEYS if key in inputs}
        if "image_grid_thw" in inputs:
            pixels = self._row_pixels(inputs, prompt_width)
            images = [image for row in leaders for image in pixels[row]]
            prompt["image_grid_thw"] = torch.stack([grid for grid, _ in images])
            prompt["pixel_values"] = torch.cat([rows for _, rows in images])
        cache = DynamicCache(config=model.config)
        base.rope_deltas = None  # computed afresh by the prompt forward, for these prompts
        try:
            out = base(**prompt, **{cache_kwarg: cache}, use_cache=True)
            last = out.last_hidden_state[:, -1:][group]  # predicts response token 0
            deltas = base.rope_deltas  # None without images: plain positions, as in the full forward
        finally:
            base.rope_deltas = None
        if length == 1:
            return last
        cache.batch_select_indices(group)
        end = prompt_width + length - 1  # the last response token predicts nothing we score
        attention = inputs["attention_mask"][:, :end]
        positions = None
        if deltas is not None:
            text_positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)[:, prompt_width:]
            positions = (text_positions + deltas[group].to(text_positions.device)).unsqueeze(0).expand(3, -1, -1)
        out = base(
            input_ids=inputs["input_ids"][:, prompt_width:end],
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg: cache},
        )
        return torch.cat([last, out.last_hidden_state], dim=1)


def _same_rows(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(ga, gb) and torch.equal(pa, pb) for (ga, pa), (gb, pb) in zip(a, b))
