"""Policy loading: any HF image-text-to-text model id or local folder.

Paths are resolved before anything heavy is loaded, so a typo in a model id
fails in a second with a message naming it, not after a download attempt or a
half-built model. Qwen2.5-VL is the first target; Qwen2-VL and other
``AutoModelForImageTextToText`` models load through the same code.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch

from vlm_post.errors import ConfigError, build_hint
from vlm_post.models.export import check_safetensors_structure, verify_hf_folder

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model_path(name: str, what: str = "model") -> str:
    """A local folder with a config.json, or a hub id that is cached or reachable. Raises ConfigError otherwise."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what} folder {name!r} has no config.json (is it an HF model folder?)")
        return str(path)
    if not _HUB_ID.match(name):
        raise ConfigError(f"{what} path not found: {name!r}{build_hint(name)}")
    from huggingface_hub import constants, hf_hub_download

    try:
        hf_hub_download(name, "config.json", local_files_only=True)
        return name
    except (OSError, ValueError):  # not in the local cache (LocalEntryNotFoundError): try the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{what} {name!r} is neither a local folder nor in the Hugging Face cache, and the hub is offline "
            f"(HF_HUB_OFFLINE=1): download it first or pass a local folder{build_hint(name)}"
        )
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:  # a quick name lookup spares the user five noisy retries when there is no network at all
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ConfigError(
            f"{what} {name!r} is neither a local folder nor in the Hugging Face cache, and the hub ({host}) "
            f"cannot be reached: download it first or pass a local folder{build_hint(name)}"
        ) from None
    try:
        hf_hub_download(name, "config.json", etag_timeout=10)
        return name
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"cannot resolve {what} {name!r}: not a local folder, not cached, and the hub said: {reason}"
        ) from None


def check_image_text_to_text(path: str, what: str = "model"):
    """The model's config, after checking that AutoModelForImageTextToText knows its architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ConfigError(f"{what} {path!r} is a {config.model_type!r} model, not an image-text-to-text model")
    return config


def load_processor(path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def load_policy(path: str, dtype: Dtype = "auto", attn_implementation: str | None = "sdpa") -> torch.nn.Module:
    """The model in train mode (``from_pretrained`` returns eval mode, which would silently disable dropout).

    Its files are checked first (``check_weights``), so a broken file is one line naming it, not a traceback.
    """
    from transformers import AutoModelForImageTextToText

    check_weights(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), attn_implementation=attn_implementation
    )
    patch_embeddings_as_matmul(model)
    return model.train()


class PatchifyConv3d(torch.nn.Conv3d):
    """A Conv3d whose kernel tiles its input without overlap (stride = kernel, no padding): a vision tower's patch
    embedding (Qwen2-VL, Qwen2.5-VL, ...). Over one patch per row, as those towers call it, it is a matrix product
    of the flattened patches and the flattened kernel: the same numbers up to float rounding, at several times the
    speed (6x on this CPU for 4,096 patches; far slower conv kernels on some GPUs and dtypes are reported upstream,
    transformers #45750). Parameters, names and shapes stay the Conv3d's, so checkpoints, exports, FSDP and the
    vLLM weight sync see no difference."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.dim() != 5 or tuple(patches.shape[2:]) != tuple(self.kernel_size):
            return super().forward(patches)  # not one patch per row: a real convolution
        flat = torch.nn.functional.linear(
            patches.reshape(patches.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias
        )
        return flat.view(*flat.shape, 1, 1, 1)


def patch_embeddings_as_matmul(model: torch.nn.Module) -> None:
    """Every non-overlapping Conv3d of ``model`` (its patch embedding) computed as a matrix product (``PatchifyConv3d``)."""
    for module in model.modules():
        if (
            type(module) is torch.nn.Conv3d
            and tuple(module.stride) == tuple(module.kernel_size)
            and tuple(module.padding) == (0, 0, 0)
            and tuple(module.dilation) == (1, 1, 1)
            and module.groups == 1
            and module.padding_mode == "zeros"
        ):
            module.__class__ = PatchifyConv3d


def check_weights(path: str, what: str = "model") -> None:
    """A local folder: ``verify_hf_folder`` (a vlm_post export by its manifest's sha256, once per process; any
    other folder by its safetensors headers and sizes). A hub id: its cached snapshot's safetensors headers and
    sizes; files not cached yet are from_pretrained's to download, unless the hub is offline."""
    from huggingface_hub import constants, hf_hub_download

    local = Path(path).expanduser()
    if local.is_dir():
        verify_hf_folder(local, what)
        return
    try:
        snapshot = Path(hf_hub_download(path, "config.json", local_files_only=True)).parent
    except (OSError, ValueError):  # not cached: from_pretrained downloads it (and says why if it cannot)
        return
    check_safetensors_structure(snapshot, f"{what} {path} (Hugging Face cache)", require_all=constants.HF_HUB_OFFLINE)


def vision_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(vision tower, projector) for the known VLM layouts: Qwen2/2.5-VL (``visual`` with a ``merger``), LLaVA-style."""
    base = getattr(model, "model", model)
    if hasattr(base, "visual"):
        return base.visual, getattr(base.visual, "merger", None)
    if hasattr(base, "vision_tower"):
        return base.vision_tower, getattr(base, "multi_modal_projector", None)
    raise ConfigError(f"cannot find the vision tower of {type(model).__name__} to freeze it")


def freeze_vision(model: torch.nn.Module, tower: bool, projector: bool) -> None:
    """Freeze the vision tower and/or the projector (Qwen's merger sits inside the tower)."""
    if not (tower or projector):
        return
    vision, proj = vision_parts(model)
    if tower:
        vision.requires_grad_(False)
        if proj is not None:
            proj.requires_grad_(not projector)
    elif projector:
        if proj is None:
            raise ConfigError(f"{type(model).__name__} has no separate projector to freeze")
        proj.requires_grad_(False)
