"""Rollout files: how a student hands its samples to a separate teacher process.

Without an in-process teacher (``model.teacher.model_name_or_path: null``), a DistillModule writes the
responses the cache lacks to ``<cache_dir>/rollouts/<name>.jsonl``, one JSON object per line::

    {"example_id": "1234", "prompt_ids": [...], "response_ids": [...]}

and waits until the cache holds their scores. ``tools/score_teacher.py`` (on other GPUs or nodes, with the
same data config) re-reads each example's images, checks that its processor gives the recorded prompt ids,
scores the responses and appends them to the cache; it marks a file done with an empty ``<name>.jsonl.done``.
Files are written atomically, so a scorer never reads half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlm_post.errors import ConfigError
from vlm_post.fs import atomic_path

ROLLOUTS_DIR = "rollouts"
DONE_SUFFIX = ".done"


def write_rollout_file(cache_dir: str | os.PathLike, name: str, records: list[dict]) -> Path:
    """Atomically write ``records`` (example_id, prompt_ids, response_ids) to ``<cache_dir>/rollouts/<name>.jsonl``."""
    folder = Path(cache_dir) / ROLLOUTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    keys = ("example_id", "prompt_ids", "response_ids")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({key: record[key] for key in keys}) + "\n" for record in records))
    return path


def read_rollout_file(path: str | os.PathLike) -> list[dict]:
    """The records of one rollout file; a malformed line is an error naming the file and line."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                if not isinstance(record.get("example_id"), str):
                    raise ValueError("example_id must be a string")  # noqa: TRY004 (one except builds the message)
                for key in ("prompt_ids", "response_ids"):
                    if not isinstance(record.get(key), list) or not all(isinstance(t, int) for t in record[key]):
                        raise ValueError(f"{key} must be a list of token ids")
            except (ValueError, AttributeError) as err:
                raise ConfigError(f"rollout file {path}, line {number}: {err}") from None
            records.append(record)
    return records


def pending_rollout_files(cache_dir: str | os.PathLike) -> list[Path]:
    """Rollout files not yet marked done, oldest name first."""
    folder = Path(cache_dir) / ROLLOUTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.jsonl") if not p.with_name(p.name + DONE_SUFFIX).exists())


def mark_done(path: Path) -> None:
    path.with_name(path.name + DONE_SUFFIX).touch()
