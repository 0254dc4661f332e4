"""HF-format export: the one artefact every stage hands to the next stage, to transformers and to vLLM."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch


def export_hf(model: torch.nn.Module, processor, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write model + processor with ``save_pretrained`` into ``out_dir``, atomically.

    The files go to a sibling temporary folder that is renamed into place, so a
    crash mid-export never leaves a half-written folder that later loads garbage.
    ``state_dict``: the full weights to write instead of the model's own (an FSDP-sharded
    model's, gathered by ``vlm_post.models.sharding.full_state_dict``).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        architectures = [_unwrapped_class(model).__name__]
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        config = json.loads((tmp / "config.json").read_text())
        if config.get("architectures") != architectures:  # FSDP2 renames the class to FSDP<name>
            config["architectures"] = architectures
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        processor.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _unwrapped_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass named ``FSDP<name>``."""
    cls = type(model)
    return next((base for base in cls.__mro__[1:] if base.__name__ == cls.__name__.removeprefix("FSDP")), cls)
