"""Weights-only initialisation from an HF folder or a vlm_post ``.ckpt`` (a file, or a sharded checkpoint folder).

This is how one stage hands its result to the next: fresh optimizer, step 0.
It is deliberately distinct from ``--ckpt_path``, Lightning's full resume
(optimizer, scheduler, step, RNG) within one stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.errors import ConfigError, build_hint
from vlm_post.models.export import MANIFEST, verify_hf_folder

POLICY_PREFIX = "policy."


def check_init_from(path: str) -> str:
    """The path, once it is known to be a checkpoint or an HF folder whose files are whole (``verify_hf_folder``:
    a vlm_post export against its manifest's sha256, any other folder by its safetensors headers and sizes)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        return str(p)
    if is_sharded_checkpoint(p):
        return str(p)
    if p.is_dir() and ((p / "config.json").is_file() or (p / MANIFEST).is_file()):  # an export missing its config
        if verify_hf_folder(p, "model.init_from") == "structure":
            rank_zero_info(
                f"model.init_from {path} has no vlm_post manifest (not an export, or one from before manifests): "
                f"its safetensors headers and sizes were checked, not their contents"
            )
        return str(p)
    if p.exists():
        raise ConfigError(
            f"model.init_from {path!r} is neither an HF model folder nor a .ckpt file or sharded checkpoint folder"
        )
    raise ConfigError(f"model.init_from not found: {path!r}{build_hint(path)}")


def is_checkpoint(path: str) -> bool:
    return Path(path).suffix == ".ckpt" or is_sharded_checkpoint(Path(path))


def is_sharded_checkpoint(path: Path) -> bool:
    """A sharded checkpoint folder (torch distributed checkpoint): one file per rank plus metadata."""
    return path.is_dir() and (path / ".metadata").is_file()


def sharded_checkpoint_writer(path: Path) -> str:
    """Which strategy wrote a sharded checkpoint folder: ``"fsdp1"`` (Lightning's FSDPStrategy keeps the module's
    tensors under ``model.``) or ``"fsdp2"`` (ModelParallelStrategy, under ``state_dict.``)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as error:
        raise ConfigError(f"sharded checkpoint folder {path}: cannot read its .metadata ({type(error).__name__}: "
                          f"{error}); was it copied whole?") from None  # fmt: skip
    return "fsdp1" if any(key.startswith("model.") for key in keys) else "fsdp2"


def policy_state_from_checkpoint(path: str, template: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The policy's weights from a Lightning checkpoint written by any vlm_post stage.

    A sharded checkpoint folder is read into ``template`` (the policy's own state dict, filled in place):
    only the policy's tensors are read, never the optimizer state beside them, and no process group is needed.
    """
    if is_sharded_checkpoint(Path(path)):
        return _policy_state_from_sharded(path, template)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise ConfigError(f"cannot read checkpoint {path!r}: {type(error).__name__}: {error}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not state:
        raise ConfigError(f"checkpoint {path!r} has no state_dict")
    policy = {k[len(POLICY_PREFIX) :]: v for k, v in state.items() if k.startswith(POLICY_PREFIX)}
    if not policy:
        raise ConfigError(f"checkpoint {path!r} holds no '{POLICY_PREFIX}*' weights (not written by vlm_post?)")
    return policy


def _policy_state_from_sharded(path: str, template: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    if template is None:
        raise ValueError("a sharded checkpoint is read into the policy's state dict: pass template")
    wanted = {POLICY_PREFIX + name: tensor for name, tensor in template.items() if not name.endswith("inv_freq")}
    top = "model" if sharded_checkpoint_writer(Path(path)) == "fsdp1" else "state_dict"
    try:
        dcp.load({top: wanted}, checkpoint_id=path, no_dist=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"cannot read the policy's weights from sharded checkpoint {path!r}: {type(error).__name__}: {first}"
        ) from None
    return {name[len(POLICY_PREFIX) :]: tensor for name, tensor in wanted.items()}


def load_policy_state(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy ``state`` into ``model``; every key must match, so a wrong architecture fails loudly."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"model.init_from {origin!r} does not match the policy architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:2]})"
        )


def check_same_architecture(policy_config, init_config, origin: str) -> None:
    """An HF folder used as init_from must be the same architecture as model_name_or_path."""

    def shape(config):
        text = getattr(config, "text_config", config)
        return (config.model_type, text.vocab_size, text.hidden_size, text.num_hidden_layers)

    if shape(policy_config) != shape(init_config):
        raise ConfigError(
            f"model.init_from {origin!r} is {shape(init_config)} (type, vocab, hidden, layers) "
            f"but the policy is {shape(policy_config)}"
        )
