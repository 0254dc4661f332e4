"""Data sources: where rows come from, and one adapter per source that normalises a row to an Example.

A source is a hub data set name (``hiyouga/geometry3k``, ``AI4Math/MathVista``)
or local files (parquet, json/jsonl, arrow, or a ``save_to_disk`` folder), read
with ``datasets``. Adapters raise ``BadRow`` for a row that cannot be used
(missing or corrupt image, empty question or answer); the DataModule reports,
counts and skips those, or fails fast.
"""

from __future__ import annotations

import glob
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlm_post.data.schema import Example
from vlm_post.errors import ConfigError, build_hint

SourceKind = Literal["geometry3k", "mathvista", "synthetic"]
_LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


class BadRow(ValueError):
    """A row that cannot become an Example; the message says why."""


@dataclass
class DataSource:
    """One data set split, as written in a config.

    Args:
        name: the name metrics are reported under, e.g. ``geo3k_val`` or ``mathvista``.
        kind: which adapter normalises the rows.
        path: a hub id or a local file/folder/glob. Ignored for ``synthetic``.
        split: the split to read from a hub id or a multi-split folder.
        limit: keep only the first ``limit`` rows (after nothing is skipped yet).
        seed: the synthetic generator's seed.
    """

    name: str
    kind: SourceKind = "geometry3k"
    path: str | None = None
    split: str = "train"
    limit: int | None = None
    seed: int = 0

    def check(self) -> None:
        """Cheap checks that run at config time, before any model or data is loaded."""
        if self.kind == "synthetic":
            return
        if not self.path:
            raise ConfigError(f"data source {self.name!r}: 'path' is required for kind {self.kind!r}")
        if _is_local(self.path) and not _local_files(self.path):
            raise ConfigError(f"data source {self.name!r}: data file not found: {self.path}{build_hint(self.path)}")


def _is_local(path: str) -> bool:
    # A hub id is "owner/name" with no file suffix; anything else that names the disk is local.
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).suffix
    return not looks_like_hub_id or Path(path).exists()


def _local_files(path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*")) if f.suffix in _LOCAL_FORMATS] or (
            [str(p)] if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() else []
        )
    return sorted(f for f in glob.glob(str(p)) if Path(f).suffix in _LOCAL_FORMATS)


def load_rows(source: DataSource):
    """The raw rows of a source as a ``datasets.Dataset`` (memory-mapped, decoded lazily)."""
    import datasets

    if source.kind == "synthetic":
        from vlm_post.data.synthetic import make_rows

        return datasets.Dataset.from_list(make_rows(source.limit or 200, seed=source.seed))
    path = source.path
    try:
        if not _is_local(path):
            rows = datasets.load_dataset(path, split=source.split)
        else:
            rows = _load_local(path, source.split)
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        where = "hub data set" if not _is_local(path) else "local data"
        raise ConfigError(
            f"data source {source.name!r}: cannot load {where} {path!r} (split {source.split!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if source.limit is not None:
        rows = rows.select(range(min(source.limit, len(rows))))
    return _images_undecoded(rows)


def _images_undecoded(rows):
    """Keep image columns as raw ``{"bytes", "path"}``: a corrupt image must reach our adapter as a
    bad row to skip, not blow up inside ``datasets`` when the row is read."""
    import datasets

    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            rows = rows.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return rows


def _load_local(path: str, split: str):
    import datasets

    p = Path(path).expanduser()
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(p))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    files = _local_files(path)
    if not files:
        raise ConfigError(f"data file not found: {path}{build_hint(path)}")
    if p.is_dir():  # a folder of split files, as on the hub: keep the requested split's files
        matching = [f for f in files if Path(f).name.startswith(split) or f"/{split}/" in f or f"{split}-" in Path(f).name]
        files = matching or files
    suffixes = {_LOCAL_FORMATS[Path(f).suffix] for f in files}
    if len(suffixes) != 1:
        raise ConfigError(f"data path {path!r} mixes file formats {sorted(suffixes)}")
    kind = suffixes.pop()
    if kind == "json" and len(files) == 1 and Path(files[0]).suffix == ".json":
        with open(files[0]) as handle:
            data = json.load(handle)
        if isinstance(data, dict):  # MathVista's testmini.json: a dict keyed by pid
            return datasets.Dataset.from_list(list(data.values()))
        return datasets.Dataset.from_list(data)
    return datasets.load_dataset(kind, data_files=files, split="train")


# --- images ---------------------------------------------------------------------------------------


def open_image(value: Any, base_dir: Path | None = None):
    """A PIL RGB image from whatever a data set stores: a PIL image, ``{"bytes", "path"}``, bytes or a path."""
    from PIL import Image

    if value is None:
        raise BadRow("missing image")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            path = value.get("path") if isinstance(value, dict) else value
            if not path:
                raise BadRow("missing image")
            path = Path(path)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise BadRow(f"missing image file {path}")
            image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except BadRow:
        raise
    except Exception as error:
        raise BadRow(f"corrupt or unreadable image ({type(error).__name__}: {error})") from None


def fit_pixels(image, min_pixels: int, max_pixels: int):
    """Resize keeping the aspect ratio so that width*height lies in [min_pixels, max_pixels]."""
    pixels = image.width * image.height
    if min_pixels <= pixels <= max_pixels:
        return image
    scale = math.sqrt((max_pixels if pixels > max_pixels else min_pixels) / pixels)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size)


# --- adapters -------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def geometry3k_example(row: dict, index: int, source: str, base_dir: Path | None = None) -> Example:
    """``hiyouga/geometry3k`` layout: images, problem, answer (+ optional id, choices, ground_truth)."""
    images = row.get("images")
    if not images:
        raise BadRow("missing image")
    question, answer = _text(row.get("problem")), _text(row.get("answer"))
    if not question:
        raise BadRow("empty question")
    if not answer:
        raise BadRow("empty answer")
    known = {"images", "problem", "answer", "id", "choices"}
    return Example(
        id=str(row.get("id", index)),
        images=[open_image(image, base_dir) for image in images],
        question=question,
        answer=answer,
        source=source,
        choices=list(row["choices"]) if row.get("choices") else None,
        answer_type="expression",
        extra={k: v for k, v in row.items() if k not in known},
    )


def mathvista_example(row: dict, index: int, source: str, base_dir: Path | None = None) -> Example:
    """``AI4Math/MathVista`` layout; choices and the expected answer form are spelled out in the question."""
    image = row.get("decoded_image") or row.get("image")
    question, answer = _text(row.get("question")), _text(row.get("answer"))
    if not question:
        raise BadRow("empty question")
    if not answer:
        raise BadRow("empty answer")
    choices = list(row["choices"]) if row.get("choices") else None
    answer_type = row.get("answer_type") or "text"
    precision = row.get("precision")
    precision = None if precision is None or (isinstance(precision, float) and math.isnan(precision)) else int(precision)
    text = question
    if row.get("question_type") == "multi_choice" and choices:
        text += "\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    elif answer_type == "integer":
        text += "\nAnswer with an integer."
    elif answer_type == "float" and precision is not None:
        text += f"\nAnswer with a number with {precision} decimal place{'s' if precision != 1 else ''}."
    elif answer_type == "list":
        text += "\nAnswer with a Python list."
    known = {"decoded_image", "image", "question", "answer", "choices", "answer_type", "precision", "unit", "pid"}
    return Example(
        id=str(row.get("pid", index)),
        images=[open_image(image, base_dir)],
        question=text,
        answer=answer,
        source=source,
        choices=choices,
        answer_type=answer_type,
        precision=precision,
        unit=_text(row.get("unit")) or None,
        extra={k: v for k, v in row.items() if k not in known},
    )


ADAPTERS = {"geometry3k": geometry3k_example, "synthetic": geometry3k_example, "mathvista": mathvista_example}
