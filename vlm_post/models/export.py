"""HF-format export: the one artefact every stage hands to the next stage, to transformers and to vLLM."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def export_hf(model: torch.nn.Module, processor, out_dir: str | Path) -> Path:
    """Write model + processor with ``save_pretrained`` into ``out_dir``, atomically.

    The files go to a sibling temporary folder that is renamed into place, so a
    crash mid-export never leaves a half-written folder that later loads garbage.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
