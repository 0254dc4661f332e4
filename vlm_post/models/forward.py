"""The decoder's last hidden states for a batch of prompt + response rows, with the work shared per prompt.

After sampling, a batch holds n rows per prompt, each with its own copy of the prompt's images
(``RolloutBatch.rows``). Running the vision encoder on every copy repeats the same work n times, in the
forward and in the backward. ``RolloutBatch.rows`` marks each image copy with the index of its original
(``image_source``); for models that take precomputed encoder outputs (transformers' ``mm_encoder_outputs``:
Qwen2-VL, Qwen2.5-VL) the encoder runs on one copy of each distinct image and its features are shared by
every row that shows it. Autograd sums the rows' gradients into that one encoder pass, so values and
gradients equal those of the repeated computation. Other models get the copies as before.

``response_hidden_states`` goes further where rows share a prompt (n samples; ``ModelRows.leaders``, known since
sampling): for the models whose 3D positions we know how to carry over (Qwen2-VL, Qwen2.5-VL, as in the rollout
engine) it runs each distinct prompt once, repeats its KV cache over the prompt's rows and runs only the
responses on top, with gradients through the shared prompt. Same values and gradients up to float rounding
(tests/test_forward.py) for about n times less prompt work; anything else takes the full forward.
"""

from __future__ import annotations

import inspect
import itertools
from typing import TYPE_CHECKING

import torch

from vlm_post.models.sharding import is_sharded, root_forward

if TYPE_CHECKING:
    from vlm_post.rollout.batch import ModelRows

# Models whose 3D (mrope) positions continue from a shared prompt: the base model keeps the prompt's
# position offsets in ``rope_deltas`` (the rollout engine's shared prefill relies on the same).
SHARED_PREFILL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Per-token processor outputs, cut to the prompt and repeated per row; the rest (pixels, grids) are per image.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def patch_starts(image_grid_thw: torch.Tensor) -> list[int]:
    """Where each image's rows start in ``pixel_values``, and one entry more: the end of the last image."""
    return [0, *image_grid_thw.prod(-1).cumsum(0).tolist()]


def images_of(image_counts: list[int], items: list[int]) -> list[int]:
    """The indices of the images of ``items`` (prompts or rows; item i has ``image_counts[i]`` images, after the
    images of the items before it), in the order of ``items``."""
    first = [0, *itertools.accumulate(image_counts)]
    return [image for item in items for image in range(first[item], first[item + 1])]


def take_images(inputs: dict, images: list[int]) -> dict:
    """``image_grid_thw`` and ``pixel_values`` of ``images`` alone (indices into ``inputs``' images)."""
    grids, pixels = inputs["image_grid_thw"], inputs["pixel_values"]
    starts = patch_starts(grids)
    rows = torch.cat([pixels[starts[i] : starts[i + 1]] for i in images]) if images else pixels[:0]
    return {"image_grid_thw": grids[images], "pixel_values": rows}


def _accepts_encoder_outputs(base: torch.nn.Module) -> bool:
    cached = getattr(base, "_vlm_post_encoder_outputs", None)
    if cached is None:
        cached = "mm_encoder_outputs" in inspect.signature(base.forward).parameters and hasattr(
            base, "get_image_features"
        )
        base._vlm_post_encoder_outputs = cached
    return cached


def encoded_once(base: torch.nn.Module, inputs: dict, image_source: torch.Tensor | None) -> dict:
    """``inputs`` for ``base`` (labels left out), with ``pixel_values`` replaced by features computed once per
    distinct image where some images are copies (``image_source``) and the model takes encoder outputs."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if (
        image_source is None
        or inputs.get("pixel_values") is None
        or not inputs["pixel_values"].numel()
        or not _accepts_encoder_outputs(base)
        or len(set(image_source.tolist())) == len(image_source)
    ):
        return inputs
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    sources = image_source.tolist()
    grids, starts = inputs["image_grid_thw"], patch_starts(inputs["image_grid_thw"])
    first: dict[int, int] = {}
    for position, source in enumerate(sources):
        first.setdefault(source, position)
    distinct = list(first.values())  # the first copy of each distinct image, in order
    pixels = inputs.pop("pixel_values")
    pixels = torch.cat([pixels[starts[i] : starts[i + 1]] for i in distinct])
    features = base.get_image_features(pixels, grids[distinct], return_dict=True).pooler_output
    slot = {source: k for k, source in enumerate(first)}
    per_image = tuple(features[slot[source]] for source in sources)
    inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_image)}
    return inputs


@root_forward
def decoder_hidden_states(
    model: torch.nn.Module, inputs: dict, image_source: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden states of an image-text-to-text model (its base ``model``), vocabulary projection left out.

    ``image_source``: per image of ``inputs``, the index of the image it copies (``ModelRows.image_source``);
    each distinct image is then encoded once. None: every image is encoded.
    """
    return model.model(**encoded_once(model.model, inputs, image_source), use_cache=False).last_hidden_state


@root_forward
def response_hidden_states(model: torch.nn.Module, rows: ModelRows) -> torch.Tensor:
    """[R, L, H]: entry j of a row is the hidden state that predicts its response token j (at
    ``rows.prompt_width + j - 1``).

    Rows that share a prompt (``rows.leaders``) run it once where the model allows: the prompt's KV cache is
    repeated over its rows (differentiably: the rows' gradients meet in the one prompt pass), then the responses
    run on top with the positions ``generate`` would give them.
    """
    from transformers import DynamicCache

    base, inputs = model.model, rows.inputs
    width, length, group = rows.prompt_width, rows.response_mask.shape[1], rows.group
    shared = not _checkpointing(model) and shares_prompts(model, inputs, rows)
    if is_sharded(model):
        # FSDP gathers per forward call: every rank must take the same path (two calls or one)
        shared = _all_ranks_agree(shared, inputs["input_ids"].device)
    if not shared:
        hidden = base(**encoded_once(base, inputs, rows.image_source), use_cache=False).last_hidden_state
        return hidden[:, width - 1 : width - 1 + length]
    cache = DynamicCache(config=model.config)
    cache_kwarg = {("cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"): cache}
    base.rope_deltas = None  # computed afresh by the prompt forward, for these prompts
    try:
        prompt = base(**prompt_inputs(inputs, rows), **cache_kwarg, use_cache=True)
        deltas = base.rope_deltas  # None without images: plain positions, as in the full forward
    finally:
        base.rope_deltas = None
    last = prompt.last_hidden_state[:, -1:][group]  # predicts response token 0
    if length == 1:
        return last
    cache.batch_select_indices(group)
    end = width + length - 1  # the last response token predicts nothing we score
    attention = inputs["attention_mask"][:, :end]
    responses = base(
        input_ids=inputs["input_ids"][:, width:end],
        attention_mask=attention,
        position_ids=response_positions(attention, width, deltas, group),
        use_cache=True,
        **cache_kwarg,
    )
    return torch.cat([last, responses.last_hidden_state], dim=1)


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


def shares_prompts(model: torch.nn.Module, inputs: dict, rows: ModelRows) -> bool:
    """Whether the shared-prompt forward applies: some rows share a prompt (the batch knows which), and what the
    batch cannot know holds: a model whose positions carry over, left-padded prompts, only inputs we can cut."""
    base = getattr(model, "model", None)
    if len(rows.leaders) == rows.num_rows or rows.prompt_width < 1:
        return False
    if model.config.model_type not in SHARED_PREFILL_MODEL_TYPES or not hasattr(base, "rope_deltas"):
        return False
    width = rows.prompt_width
    if not bool(inputs["attention_mask"][:, width - 1].all()):
        return False  # the prompts must be left-padded: the prompt's last column is every row's last prompt token
    known = set(PER_TOKEN_KEYS) | {"pixel_values", "image_grid_thw"}
    if any(key not in known for key, value in inputs.items() if isinstance(value, torch.Tensor)):
        return False  # an input we would not know how to cut and repeat (videos, ...)
    token_types = inputs.get("mm_token_type_ids")
    return token_types is None or not bool(token_types[:, width - 1].any())


def prompt_inputs(inputs: dict, rows: ModelRows) -> dict:
    """The inputs of each distinct prompt once: the leaders' per-token inputs cut to the prompt, their images."""
    prompt = {key: inputs[key][rows.leaders, : rows.prompt_width] for key in PER_TOKEN_KEYS if key in inputs}
    if "image_grid_thw" in inputs:
        prompt.update(take_images(inputs, images_of(rows.image_counts, rows.leaders)))
    return prompt


def response_positions(
    attention: torch.Tensor, width: int, deltas: torch.Tensor | None, group: torch.Tensor
) -> torch.Tensor | None:
    """The 3D positions of the response tokens after a shared prompt: text positions plus the prompt's offset
    (``rope_deltas``, per prompt, repeated over its rows by ``group``); None for plain positions."""
    if deltas is None:
        return None
    text_positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)[:, width:]
    return (text_positions + deltas[group].to(text_positions.device)).unsqueeze(0).expand(3, -1, -1)
