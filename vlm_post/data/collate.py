"""Collation: Examples -> processor tensors.

One processor call per batch encodes the prompts (chat template, image-token
expansion, pixel values). From it we build:

- ``prompt``: the processor's outputs as they are, left-padded for generation;
- ``sft``: prompt + target tokens, right-padded, with ``labels`` = -100 over the
  prompt, the image tokens and padding, so the loss sees assistant tokens only.

Every processor output is kept. Per-token outputs (``mm_token_type_ids`` and
whatever a processor adds) are extended with zeros over the target, because
Qwen2.5-VL derives its mrope positions from them; dropping one silently
breaks positions rather than failing.
"""

from __future__ import annotations

import torch

from vlm_post.data.prompting import DEFAULT_ANSWER_TEMPLATE, DEFAULT_INSTRUCTION, build_messages, sft_target
from vlm_post.data.schema import Example
from vlm_post.losses.sft import IGNORE_INDEX


def end_of_turn_text(processor) -> str:
    """What the chat template writes after an assistant message (``<|im_end|>`` for Qwen)."""
    marker = "\u2063END\u2063"
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": marker}],
        tokenize=False,
    )
    return rendered.split(marker, 1)[1].rstrip()


def prompt_text(processor, example: Example, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt as the chat template renders it: the user turn, then the assistant's generation prompt."""
    return processor.apply_chat_template(
        build_messages(example, instruction), add_generation_prompt=True, tokenize=False
    )


def prompt_token_count(processor, text: str, images: list) -> int:
    """How many tokens the processor makes of a rendered prompt and its images, without processing any pixels.

    The text is tokenized as the processor tokenizes it; each image placeholder then counts as that image's tokens,
    from its size, where the processor can tell (``_get_num_multimodal_tokens``: Qwen2-VL, Qwen2.5-VL and most
    image-text processors in transformers), else as the one placeholder token.
    """
    ids = processor.tokenizer(text)["input_ids"]
    image_token_id = getattr(processor, "image_token_id", None)
    if not images or image_token_id is None:
        return len(ids)
    try:
        image_tokens = processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width) for im in images])
    except (AttributeError, NotImplementedError):  # a processor that cannot say without the pixels
        return len(ids)
    return len(ids) - ids.count(image_token_id) + sum(image_tokens.num_image_tokens)


def per_token_keys(encoding: dict, input_ids: torch.Tensor) -> list[str]:
    return [
        key
        for key, value in encoding.items()
        if isinstance(value, torch.Tensor) and value.shape == input_ids.shape and key != "input_ids"
    ]


class Collator:
    """Callable collate_fn producing ``{"examples", "prompt"?, "sft"?}``."""

    def __init__(
        self,
        processor,
        instruction: str = DEFAULT_INSTRUCTION,
        with_prompt: bool = True,
        with_sft: bool = False,
        target_column: str | None = None,
        answer_template: str = DEFAULT_ANSWER_TEMPLATE,
        max_target_tokens: int | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.instruction = instruction
        self.with_prompt = with_prompt
        self.with_sft = with_sft
        self.target_column = target_column
        self.answer_template = answer_template
        self.max_target_tokens = max_target_tokens
        self.turn_end = end_of_turn_text(processor) if with_sft else ""
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def prompt_texts(self, examples: list[Example]) -> list[str]:
        return [prompt_text(self.processor, example, self.instruction) for example in examples]

    def __call__(self, examples: list[Example]) -> dict:
        images = [image for example in examples for image in example.images]
        encoding = self.processor(
            text=self.prompt_texts(examples),
            images=images or None,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        encoding = dict(encoding)
        # Images per example, to regroup pixel rows when prompts are repeated for n samples.
        batch: dict = {"examples": examples, "image_counts": [len(example.images) for example in examples]}
        if self.with_prompt:
            batch["prompt"] = encoding
        if self.with_sft:
            batch["sft"] = self._sft_batch(encoding, examples)
        return batch

    def _sft_batch(self, encoding: dict, examples: list[Example]) -> dict:
        input_ids, attention = encoding["input_ids"], encoding["attention_mask"].bool()
        token_keys = per_token_keys(encoding, input_ids)
        targets = [sft_target(e, self.target_column, self.answer_template) + self.turn_end for e in examples]
        target_ids = self.tokenizer(targets, add_special_tokens=False)["input_ids"]
        if self.max_target_tokens is not None:
            target_ids = [ids[: self.max_target_tokens] for ids in target_ids]
        rows = []
        for i, ids in enumerate(target_ids):
            prompt = input_ids[i][attention[i]]
            target = torch.tensor(ids, dtype=input_ids.dtype)
            row = {
                "input_ids": torch.cat([prompt, target]),
                "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), target]),
            }
            for key in token_keys:  # attention_mask, mm_token_type_ids, ...
                value = encoding[key][i][attention[i]]
                fill = 1 if key == "attention_mask" else 0
                row[key] = torch.cat([value, torch.full((len(target),), fill, dtype=value.dtype)])
            rows.append(row)
        width = max(len(row["input_ids"]) for row in rows)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        out = {
            key: torch.stack(
                [
                    torch.nn.functional.pad(row[key], (0, width - len(row[key])), value=pad_values.get(key, 0))
                    for row in rows
                ]
            )
            for key in rows[0]
        }
        # Image tensors are not per token: pass them through unchanged.
        for key, value in encoding.items():
            if key not in out:
                out[key] = value
        return out
