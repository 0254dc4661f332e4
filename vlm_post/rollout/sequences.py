"""Prompt + response sequences for a policy forward pass (log-probs, entropy, KL).

After sampling, each of the B*n responses is scored by running the policy on
its prompt followed by the response. Building that batch by hand is where
silent bugs live, so it is done once, here:

- prompts are repeated ``n`` times, and so are their images' patch rows in
  ``pixel_values`` (grouped per prompt, in order) and their ``image_grid_thw`` rows;
- per-token processor outputs (``mm_token_type_ids``, ...) are extended with
  zeros over the response: Qwen2.5-VL derives mrope positions from them, and a
  missing or short one shifts every position without any error;
- the attention mask covers the (left-padded) prompt and the response up to
  its end; ``response_mask`` marks the positions whose log-prob is wanted.
"""

from __future__ import annotations

import torch

from vlm_post.models.forward import IMAGE_SOURCE
from vlm_post.rollout.base import Rollouts


def repeat_prompts(prompt: dict, image_counts: list[int], n: int) -> dict:
    """Each prompt's tensors repeated ``n`` times consecutively (rows 0..n-1 answer prompt 0)."""
    batch = prompt["input_ids"].shape[0]
    out = {}
    for key, value in prompt.items():
        if (
            isinstance(value, torch.Tensor)
            and value.dim() >= 1
            and value.shape[0] == batch
            and key
            not in (
                "pixel_values",
                "image_grid_thw",
            )
        ):
            out[key] = value.repeat_interleave(n, dim=0)
        elif key not in ("pixel_values", "image_grid_thw"):
            out[key] = value
    if "image_grid_thw" in prompt:
        grids = prompt["image_grid_thw"]
        patches = grids.prod(-1).tolist()
        pixel_chunks = list(torch.split(prompt["pixel_values"], patches))
        grid_rows = list(grids.unbind(0))
        pixels, grid_out, sources, start = [], [], [], 0
        for count in image_counts:
            chunk_pixels, chunk_grids = pixel_chunks[start : start + count], grid_rows[start : start + count]
            for _ in range(n):
                pixels += chunk_pixels
                grid_out += chunk_grids
                sources += range(start, start + count)
            start += count
        if start != len(patches):
            raise ValueError(f"image_counts sum to {start} but the batch has {len(patches)} images")
        out["pixel_values"] = torch.cat(pixels) if pixels else prompt["pixel_values"][:0]
        out["image_grid_thw"] = torch.stack(grid_out) if grid_out else grids[:0]
        out[IMAGE_SOURCE] = torch.tensor(sources, dtype=torch.long)  # lets the forward encode each image once
    return out


def policy_inputs(prompt: dict, image_counts: list[int], rollouts: Rollouts, n: int) -> dict:
    """Model inputs over prompt + response for the B*n rows of ``rollouts``.

    The prompt part is ``prompt["input_ids"].shape[1]`` wide (left-padded), so
    the hidden state that predicts response token ``j`` sits at ``prompt_width + j - 1``.
    """
    repeated = repeat_prompts(prompt, image_counts, n)
    prompt_ids, prompt_attention = repeated["input_ids"], repeated["attention_mask"]
    rows, prompt_width = prompt_ids.shape
    response_ids, response_mask = rollouts.response_ids, rollouts.response_mask
    inputs = dict(repeated)
    # Padding after a response's end is masked out; its id only has to be a valid, non-vision token.
    inputs["input_ids"] = torch.cat([prompt_ids, response_ids.masked_fill(response_mask == 0, 0)], dim=1)
    inputs["attention_mask"] = torch.cat([prompt_attention, response_mask.to(prompt_attention.dtype)], dim=1)
    for key, value in repeated.items():
        if key in ("input_ids", "attention_mask", IMAGE_SOURCE) or not isinstance(value, torch.Tensor):
            continue
        if value.shape[:2] == (rows, prompt_width):  # per-token: zeros (text) over the response
            inputs[key] = torch.cat([value, value.new_zeros(rows, response_ids.shape[1])], dim=1)
    return inputs


def select_rows(inputs: dict, rows: list[int] | slice, n: int, image_counts: list[int]) -> dict:
    """Rows ``rows`` (indices or a slice) of a repeated prompt+response batch, with their images' pixel rows.

    Row r is a copy of prompt r // n, which owns ``image_counts[r // n]`` consecutive images.
    """
    total = inputs["input_ids"].shape[0]
    index = torch.arange(total)[rows] if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
    out = {
        key: value[index.to(value.device)]
        for key, value in inputs.items()
        if isinstance(value, torch.Tensor)
        and value.shape[:1] == (total,)
        and key not in ("pixel_values", "image_grid_thw", IMAGE_SOURCE)
    }
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"]
        per_row = torch.tensor([count for count in image_counts for _ in range(n)])
        first_image = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)]).tolist()
        patch_start = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
        images = [i for r in index.tolist() for i in range(first_image[r], first_image[r + 1])]
        out["image_grid_thw"] = grids[images] if images else grids[:0]
        if IMAGE_SOURCE in inputs:
            out[IMAGE_SOURCE] = inputs[IMAGE_SOURCE][images] if images else inputs[IMAGE_SOURCE][:0]
        pixels = [inputs["pixel_values"][patch_start[i] : patch_start[i + 1]] for i in images]
        out["pixel_values"] = torch.cat(pixels) if pixels else inputs["pixel_values"][:0]
    return out
