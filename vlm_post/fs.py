"""Durable file-system steps that checkpoints, exports, the teacher cache and the study share."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def atomic_path(path: Path, exclusive: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` (``.<name>.<pid>.<random>.tmp``) for the block to write. When the block
    ends cleanly the file is fsynced and renamed onto ``path``, then the folder is fsynced: a reader sees the old
    file or the new one, never a part, and a crash keeps one of them. ``exclusive``: hard-linked instead, so an
    existing ``path`` is kept and ``FileExistsError`` raised (of two writers racing, one wins). The temporary
    file never outlives the block."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
