"""The decoder's last hidden states for a batch of prompt + response rows, with the work shared per prompt.

After sampling, a batch holds n rows per prompt, each with its own copy of the prompt's images
(``RolloutBatch.rows``). Running the vision encoder on every copy repeats the same work n times, in the
forward and in the backward. ``RolloutBatch.rows`` marks each image copy with the index of its original
(``image_source``); for models that take precomputed encoder outputs (transformers' ``mm_encoder_outputs``:
Qwen2-VL, Qwen2.5-VL) the encoder runs on one copy of each distinct image and its features are shared by
every row that shows it. Autograd sums the rows' gradients into that one encoder pass, so values and
gradients equal those of the repeated computation. Other models get the copies as before.

``response_hidden_states`` goes further where the rows come as runs of copies of one prompt (n samples):
for the models whose 3D positions we know how to carry over (Qwen2-VL, Qwen2.5-VL, as in the rollout
engine) it runs each distinct prompt once, repeats its KV cache over the prompt's rows and runs only the
responses on top, with gradients through the shared prompt. Same values and gradients up to float rounding
(tests/test_forward.py) for about n times less prompt work; anything else takes the full forward.
"""

from __future__ import annotations

import inspect

import torch

from vlm_post.models.sharding import as_root_forward, is_sharded

IMAGE_SOURCE = "image_source"  # per image in the batch: the index of the original it copies (not a model input)
# Models whose 3D (mrope) positions continue from a shared prompt: the base model keeps the prompt's
# position offsets in ``rope_deltas`` (the rollout engine's shared prefill relies on the same).
SHARED_PREFILL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Per-token processor outputs, cut to the prompt and repeated per row; the rest (pixels, grids) are per image.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def _accepts_encoder_outputs(base: torch.nn.Module) -> bool:
    cached = getattr(base, "_vlm_post_encoder_outputs", None)
    if cached is None:
        cached = "mm_encoder_outputs" in inspect.signature(base.forward).parameters and hasattr(
            base, "get_image_features"
        )
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
    return as_root_forward(model, _decoder_hidden_states, model, inputs)


def _decoder_hidden_states(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    base = model.model
    shareable = IMAGE_SOURCE in inputs and inputs.get("pixel_values") is not None and inputs["pixel_values"].numel()
    if (
        shareable
        and _accepts_encoder_outputs(base)
        and len(set(inputs[IMAGE_SOURCE].tolist())) < len(inputs[IMAGE_SOURCE])
    ):
        inputs = shared_image_features(base, inputs)
    else:
        inputs.pop(IMAGE_SOURCE, None)
    return base(**inputs, use_cache=False).last_hidden_state


def response_hidden_states(model: torch.nn.Module, inputs: dict, prompt_width: int, length: int) -> torch.Tensor:
    """[R, length, H]: entry j is the hidden state that predicts response token j (at ``prompt_width + j - 1``)."""
    return as_root_forward(model, _response_hidden_states, model, inputs, prompt_width, length)


def _response_hidden_states(model: torch.nn.Module, inputs: dict, prompt_width: int, length: int) -> torch.Tensor:
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    groups = None if _checkpointing(model) else prompt_groups(model, inputs, prompt_width)
    if is_sharded(model) and not _all_ranks_agree(groups is not None, inputs["input_ids"].device):
        groups = None  # FSDP gathers per forward call: every rank must take the same path (two calls or one)
    if groups is not None:
        return shared_prompt_hidden_states(model, inputs, prompt_width, length, *groups)
    hidden = _decoder_hidden_states(model, inputs)
    return hidden[:, prompt_width - 1 : prompt_width - 1 + length]


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Activation checkpointing replays the forward without a cache: keep the full forward then."""
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, flag, False))


def prompt_groups(model: torch.nn.Module, inputs: dict, prompt_width: int) -> tuple[list[int], torch.Tensor] | None:
    """(first row of each distinct prompt, index of each row's prompt among them) when some consecutive rows
    share their prompt (ids, per-token inputs and pixel rows) and the shared forward applies; else None."""
    ids, base = inputs["input_ids"], getattr(model, "model", None)
    if model.config.model_type not in SHARED_PREFILL_MODEL_TYPES or not hasattr(base, "rope_deltas"):
        return None
    rows = ids.shape[0]
    if rows < 2 or prompt_width < 1 or not bool(inputs["attention_mask"][:, prompt_width - 1].all()):
        return None  # the prompts must be left-padded: the prompt's last column is every row's last prompt token
    known = set(PER_TOKEN_KEYS) | {"pixel_values", "image_grid_thw", IMAGE_SOURCE}
    if any(key not in known for key, value in inputs.items() if isinstance(value, torch.Tensor)):
        return None  # an input we would not know how to cut and repeat (videos, ...)
    token_types = inputs.get("mm_token_type_ids")
    if token_types is not None and bool(token_types[:, prompt_width - 1].any()):
        return None
    pixels = _row_images(model, inputs, prompt_width)
    if pixels is None:
        return None
    per_token = [inputs[key][:, :prompt_width] for key in PER_TOKEN_KEYS if key in inputs]
    leaders, group = [0], [0]
    for row in range(1, rows):
        same = all(torch.equal(value[row], value[row - 1]) for value in per_token)
        if not (same and _same_images(pixels[row], pixels[row - 1])):
            leaders.append(row)
        group.append(len(leaders) - 1)
    if len(leaders) == rows:
        return None
    return leaders, torch.tensor(group, device=ids.device)


def _row_images(model: torch.nn.Module, inputs: dict, prompt_width: int) -> list[tuple] | None:
    """Per row, its images' (grid, pixel rows), in order; None when the image tokens do not add up."""
    rows = inputs["input_ids"].shape[0]
    if "image_grid_thw" not in inputs:
        return [() for _ in range(rows)]
    config = model.config
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
    return [tuple((grids[i], pixel_values[patch_starts[i] : patch_starts[i + 1]]) for i in images) for images in out]


def _same_images(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(ga, gb) and torch.equal(pa, pb) for (ga, pa), (gb, pb) in zip(a, b))


def shared_prompt_hidden_states(
    model: torch.nn.Module, inputs: dict, prompt_width: int, length: int, leaders: list[int], group: torch.Tensor
) -> torch.Tensor:
    """``response_hidden_states`` with each distinct prompt run once: its KV cache is repeated over its rows
    (differentiably: the rows' gradients meet in the one prompt pass), then the responses run on top with
    the positions ``generate`` would give them."""
    from transformers import DynamicCache

    base = model.model
    cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    prompt = {key: inputs[key][leaders, :prompt_width] for key in PER_TOKEN_KEYS if key in inputs}
    if "image_grid_thw" in inputs:
        images = [image for row in leaders for image in _row_images(model, inputs, prompt_width)[row]]
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
