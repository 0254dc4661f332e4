"""Atomic checkpoint writes: a run killed while saving keeps its previous checkpoint intact.

Lightning's ``TorchCheckpointIO`` writes straight to the final path, so a kill
mid-write leaves a truncated ``last.ckpt`` that the next ``--ckpt_path`` fails
on. We write to a temporary file beside it and ``os.replace`` it into place,
which is atomic on POSIX file systems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.fs import atomic_path
from vlm_post.internals import load_fsdp1_full_checkpoints_with
from vlm_post.models.export import discard, export_leftovers, restore_pointer


def read_fsdp_full_checkpoints_with_mmap() -> None:
    """Make Lightning's FSDPStrategy (FSDP1) read full-state checkpoint files with ``torch.load(mmap=True)``.

    Lightning 2.6 reads them with its own lazy unpickler, which fails on every file torch 2.14 writes
    (``'UntypedStorage' object has no attribute 'dtype'``), so ``--ckpt_path last.ckpt`` could not resume an FSDP1
    run with ``state_dict_type: full``. A memory-mapped load is just as lazy (pages are read when touched) and is
    what Lightning's own ModelParallelStrategy uses for the same files.
    """
    load_fsdp1_full_checkpoints_with(_mmap_load)


def _mmap_load(path) -> Any:
    # Our own checkpoints (hyperparameters, loop state): not weights-only.
    return torch.load(path, mmap=True, map_location="cpu", weights_only=False)


def remove_leftovers(checkpoint_dir: Path, export_dir: Path) -> list[Path]:
    """Delete what a kill in the middle of a save left: ``.<name>.*.tmp`` files of ``AtomicCheckpointIO`` in
    ``checkpoint_dir``, and beside ``export_dir`` the temporary ``.<export name>.*`` folders and links and the
    stale ``<export name>.<n>`` versions of ``export_hf`` (``vlm_post.models.export.export_leftovers``; never
    the version ``export_dir`` points to). Returns them. An ``export_dir`` that a kill left missing beside a
    complete version is pointed at it first (``restore_pointer``).

    Only these names are touched: both writers make them, and neither keeps one past its own save.
    """
    found = [p for p in checkpoint_dir.glob(".*.tmp") if p.is_file()] if checkpoint_dir.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    restored = restore_pointer(export_dir)
    if restored is not None:
        rank_zero_info(f"vlm_post: {export_dir} now points to {restored.name}, the export a kill had left unlinked")
    exports = export_leftovers(export_dir)
    for path in exports:
        discard(path, export_dir)
    return found + exports


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)
