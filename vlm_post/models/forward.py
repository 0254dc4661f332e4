"""The decoder's last hidden states for a batch of rows, each image encoded once.

After sampling, a batch holds n rows per prompt, each with its own copy of the prompt's images
(``rollout.sequences``). Running the vision encoder on every copy repeats the same work n times, in the
forward and in the backward. ``rollout.sequences`` marks each image copy with the index of its original
(``image_source``); for models that take precomputed encoder outputs (transformers' ``mm_encoder_outputs``:
Qwen2-VL, Qwen2.5-VL) the encoder runs on one copy of each distinct image and its features are shared by
every row that shows it. Autograd sums the rows' gradients into that one encoder pass, so values and
gradients equal those of the repeated computation. Other models get the copies as before.
"""

from __future__ import annotations

import inspect

import torch

IMAGE_SOURCE = "image_source"  # per image in the batch: the index of the original it copies (not a model input)


def _accepts_encoder_outputs(base: torch.nn.Module) -> bool:
    cached = getattr(base, "_vlm_post_encoder_outputs", None)
    if cached is None:
        cached = "mm_encoder_outputs" in inspect.signature(base.forward).parameters and hasattr(base, "get_image_features")
        base._vlm_post_encoder_outputs = cached
    return cached


def shared_image_features(base: torch.nn.Module, inputs: dict) -> dict:
    """``inputs`` with ``pixel_values`` replaced by features computed once per distinct image."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    sources = inputs[IMAGE_SOURCE].tolist()
    grids = inputs["image_grid_thw"]
    starts = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
    first: dict[int, int] = {}
    for position, source in enumerate(sources):
        first.setdefault(source, position)
    distinct = list(first.values())  # the first copy of each distinct image, in order
    pixels = torch.cat([inputs["pixel_values"][starts[i] : starts[i + 1]] for i in distinct])
    features = base.get_image_features(pixels, grids[distinct], return_dict=True).pooler_output
    slot = {source: k for k, source in enumerate(first)}
    per_image = tuple(features[slot[source]] for source in sources)
    out = {k: v for k, v in inputs.items() if k not in (IMAGE_SOURCE, "pixel_values")}
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_image)}
    return out


def decoder_hidden_states(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Last hidden states of an image-text-to-text model (its base ``model``), vocabulary projection left out."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    base = model.model
    shareable = IMAGE_SOURCE in inputs and inputs.get("pixel_values") is not None and inputs["pixel_values"].numel()
    if shareable and _accepts_encoder_outputs(base) and len(set(inputs[IMAGE_SOURCE].tolist())) < len(inputs[IMAGE_SOURCE]):
        inputs = shared_image_features(base, inputs)
    else:
        inputs.pop(IMAGE_SOURCE, None)
    return base(**inputs, use_cache=False).last_hidden_state
