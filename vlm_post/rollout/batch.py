"""RolloutBatch: one batch of samples, built once by the rollout engine and passed whole.

Row r of a batch answers prompt ``r // n``: the engine knows this when it samples, so the batch keeps it, with
the prompts un-repeated (each image's pixel rows once). ``rows(idx)`` gives the model inputs of any subset of
rows as ``ModelRows``: a plain prompt + response batch (each row with its own copy of its prompt and images) and,
as fields, what a forward can share: which image each image copy repeats, and which rows share a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlm_post.models.forward import images_of, take_images

if TYPE_CHECKING:
    from vlm_post.rollout.base import Rollouts

# The processor outputs that are per image, not per prompt.
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
RowIndex = Sequence[int] | slice | torch.Tensor | None


@dataclass
class ModelRows:
    """Model inputs of R rows of prompt + response, and the structure a forward may share.

    ``inputs``: the (R, W + L) inputs of a plain forward, each row with its own copy of its prompt and images;
    the hidden state that predicts response token j of a row sits at position ``prompt_width + j - 1``.
    ``image_counts``: images per row (a row's images follow the previous rows' in ``inputs``).
    ``image_source``: per image of ``inputs``, the index of the batch image it copies (None without images), so
    that a forward encodes each distinct image once.
    ``leaders``: the first row of each run of consecutive rows that answer the same prompt; ``group[r]`` is
    row r's run. Rows of one prompt share the prompt's ids, per-token inputs and images exactly.
    """

    inputs: dict
    prompt_width: int
    response_mask: torch.Tensor
    image_counts: list[int]
    image_source: torch.Tensor | None
    leaders: list[int]
    group: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.response_mask.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        """(R, L) the response tokens (padding after a response's end is 0, masked out)."""
        return self.inputs["input_ids"][:, self.prompt_width :]


@dataclass
class RolloutBatch:
    """Responses to B prompts, ``n`` per prompt (rows grouped: rows 0..n-1 answer prompt 0).

    ``prompt``: the processor's outputs, un-repeated and left-padded; ``image_counts``: images per prompt.
    ``response_ids`` (B*n, L) are right-padded; ``response_mask`` marks real tokens, the stop token of a finished
    response included; ``sampler_logprobs`` (B*n, L) are the sampler's log-probs of the drawn tokens, under the
    distribution it drew from, when the engine was asked for them.
    """

    prompt: dict
    image_counts: list[int]
    n: int
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    sampler_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        prompts, rows = self.prompt["input_ids"].shape[0], self.response_ids.shape[0]
        if rows != prompts * self.n:
            raise ValueError(f"{rows} responses for {prompts} prompts x n={self.n}")
        if len(self.image_counts) != prompts:
            raise ValueError(f"{len(self.image_counts)} image counts for {prompts} prompts")
        images = self.prompt["image_grid_thw"].shape[0] if "image_grid_thw" in self.prompt else 0
        if sum(self.image_counts) != images:
            raise ValueError(f"image counts sum to {sum(self.image_counts)}, the prompts hold {images} images")

    @classmethod
    def from_rollouts(cls, prompt: dict, image_counts: list[int], rollouts: Rollouts, n: int) -> RolloutBatch:
        return cls(
            prompt,
            list(image_counts),
            n,
            rollouts.response_ids,
            rollouts.response_mask,
            rollouts.finished,
            rollouts.texts,
            rollouts.logprobs,
        )

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_width(self) -> int:
        return self.prompt["input_ids"].shape[1]

    @property
    def prompt_index(self) -> torch.Tensor:
        """(B*n,) the prompt each row answers."""
        return torch.arange(self.num_rows, device=self.response_ids.device) // self.n

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def rows(self, idx: RowIndex = None) -> ModelRows:
        """The model inputs of rows ``idx`` (indices, a slice, or all), in that order.

        Per-token processor outputs (``mm_token_type_ids``, ...) are extended with zeros over the response:
        Qwen2.5-VL derives its mrope positions from them, and a short one shifts every position silently.
        """
        index = self._index(idx)
        prompts = (index // self.n).tolist()
        response_ids = self.response_ids[index]
        response_mask = self.response_mask[index]
        width, length, batch = self.prompt_width, response_ids.shape[1], len(self.image_counts)
        inputs = {}
        for key, value in self.prompt.items():
            if key in IMAGE_KEYS:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
                inputs[key] = value
                continue
            value = value[torch.as_tensor(prompts, device=value.device)]
            if key == "input_ids":  # padding after a response's end is masked out: any valid, non-vision id
                value = torch.cat([value, response_ids.masked_fill(response_mask == 0, 0).to(value.device)], dim=1)
            elif key == "attention_mask":
                value = torch.cat([value, response_mask.to(value)], dim=1)
            elif value.dim() >= 2 and value.shape[1] == width:  # per token: zeros (text) over the response
                value = torch.cat([value, value.new_zeros(value.shape[0], length, *value.shape[2:])], dim=1)
            inputs[key] = value
        image_source = None
        if "image_grid_thw" in self.prompt:
            images = images_of(self.image_counts, prompts)
            inputs.update(take_images(self.prompt, images))
            image_source = torch.tensor(images, dtype=torch.long)
        leaders = [r for r in range(len(prompts)) if r == 0 or prompts[r] != prompts[r - 1]]
        group = torch.tensor(_runs(prompts), dtype=torch.long, device=response_ids.device)
        image_counts = [self.image_counts[p] for p in prompts]
        return ModelRows(inputs, width, response_mask, image_counts, image_source, leaders, group)

    def _index(self, idx: RowIndex) -> torch.Tensor:
        every = torch.arange(self.num_rows)
        if idx is None:
            return every
        if isinstance(idx, slice):
            return every[idx]
        return torch.as_tensor(idx, dtype=torch.long).cpu().reshape(-1)


def _runs(values: list[int]) -> list[int]:
    """Per position, the index of its run of equal consecutive values (0, 0, 1, 1, 1, 2, ...)."""
    out, run = [], -1
    for position, value in enumerate(values):
        if position == 0 or value != values[position - 1]:
            run += 1
        out.append(run)
    return out
