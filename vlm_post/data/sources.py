"""Data sources: where rows come from, and one adapter per source that normalises a row to an Example.

A source is a hub data set name (``hiyouga/geometry3k``, ``AI4Math/MathVista``)
or local files (parquet, json/jsonl, arrow, or a ``save_to_disk`` folder), read
with ``datasets``; JSON files are read here, line by line. Adapters raise
``BadRow`` for a row that cannot be used (missing or corrupt image, empty
question or answer); a JSON line that cannot even be read as a row (not UTF-8,
not JSON, not an object, empty) is one too, named by its file and line. The
DataModule reports, counts and skips those, or fails fast. A file that cannot
be read at all (a corrupt parquet file, a JSON document with a bad byte) is a
``ConfigError`` naming the file.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm_post.data.schema import Example
from vlm_post.errors import ConfigError, build_hint
from vlm_post.ranges import NonNegativeInt, PositiveInt

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
        limit: keep only the first ``limit`` rows, bad ones included (they are skipped after the limit is taken).
        seed: the synthetic generator's seed.
    """

    name: str
    kind: SourceKind = "geometry3k"
    path: str | None = None
    split: str = "train"
    limit: PositiveInt | None = None
    seed: NonNegativeInt = 0

    def check(self) -> None:
        """Cheap checks that run at config time, before any model or data is loaded."""
        if self.kind == "synthetic":
            return
        if not self.path:
            raise ConfigError(f"data source {self.name!r}: 'path' is required for kind {self.kind!r}")
        if _is_local(self.path):
            _check_local_path(self.name, self.path, self.split)


def _check_local_path(name: str, path: str, split: str) -> None:
    """The path names readable data: files of a known format (parquet and arrow files with an intact footer or
    schema), or a ``save_to_disk`` folder. JSON files are checked row by row when they are read."""
    p = Path(path).expanduser()
    if _is_saved_dataset(p):
        return
    formats = f"{', '.join(sorted(_LOCAL_FORMATS))} or a save_to_disk folder"
    if not _local_files(path):
        missing = f"no data files ({formats}) in folder {path}" if p.is_dir() else f"data file not found: {path}"
        raise ConfigError(f"data source {name!r}: {missing}{build_hint(path)}")
    if p.is_file() and p.suffix not in _LOCAL_FORMATS:
        raise ConfigError(
            f"data source {name!r}: {path}: unsupported data file format {p.suffix or '(no suffix)'!r} (read: {formats})"
        )
    try:
        files, kind = _split_files(path, split)
        for file in files if kind != "json" else []:
            _check_readable(file, kind)
    except ConfigError as error:
        raise ConfigError(f"data source {name!r}: {error}") from None


@dataclass
class SourceRows:
    """The rows of a source, and the records that could not even be read as rows.

    ``unreadable`` holds ``(where, why)`` per record, e.g. ``("data/train.jsonl line 3", "not valid UTF-8 ...")``:
    they count toward ``DataSource.limit`` and are reported and skipped like any other bad row.
    """

    rows: Any  # a datasets.Dataset
    unreadable: list[tuple[str, str]] = field(default_factory=list)


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


def load_rows(source: DataSource) -> SourceRows:
    """The raw rows of a source as a ``datasets.Dataset`` (decoded lazily), and the records that are unreadable."""
    import datasets

    if source.kind == "synthetic":
        from vlm_post.data.synthetic import make_rows

        return SourceRows(datasets.Dataset.from_list(make_rows(source.limit or 200, seed=source.seed)))
    path = source.path
    try:
        if not _is_local(path):
            loaded = SourceRows(datasets.load_dataset(path, split=source.split))
        else:
            loaded = _load_local(path, source.split, source.limit)
    except ConfigError as error:
        raise ConfigError(f"data source {source.name!r}: {error}") from None
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        where = "hub data set" if not _is_local(path) else "local data"
        raise ConfigError(
            f"data source {source.name!r}: cannot load {where} {path!r} (split {source.split!r}): {_first_line(error)}"
        ) from None
    rows = loaded.rows
    if source.limit is not None:
        rows = rows.select(range(min(source.limit, len(rows))))
    return SourceRows(_images_undecoded(rows), loaded.unreadable)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


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


def _load_local(path: str, split: str, limit: int | None = None) -> SourceRows:
    import datasets

    p = Path(path).expanduser()
    if _is_saved_dataset(p):
        loaded = datasets.load_from_disk(str(p))
        return SourceRows(loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded)
    files, kind = _split_files(path, split)
    if kind == "json":
        return _read_json_files(files, limit)
    for file in files:  # a truncated or foreign file, named, before datasets reports it without its name
        _check_readable(file, kind)
    return SourceRows(datasets.load_dataset(kind, data_files=files, split="train"))


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())


def _split_files(path: str, split: str) -> tuple[list[str], str]:
    """The files of ``split`` under ``path`` and their one format (``parquet``, ``json`` or ``arrow``)."""
    files = _local_files(path)
    if not files:
        raise ConfigError(f"data file not found: {path}{build_hint(path)}")
    if Path(path).expanduser().is_dir():  # a folder of split files, as on the hub: keep the requested split's files
        matching = [
            f for f in files if Path(f).name.startswith(split) or f"/{split}/" in f or f"{split}-" in Path(f).name
        ]
        files = matching or files
    kinds = {_LOCAL_FORMATS[Path(f).suffix] for f in files}
    if len(kinds) != 1:
        raise ConfigError(f"data path {path!r} mixes file formats {sorted(kinds)}")
    return files, kinds.pop()


def _check_readable(file: str, kind: str) -> None:
    """Read a parquet file's footer or an arrow file's schema: cheap, and it catches a truncated or foreign file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            pq.ParquetFile(file).close()
        else:
            with pa.memory_map(file) as handle:
                try:
                    pa.ipc.open_stream(handle)  # reads the schema: what save_to_disk and datasets write
                except pa.ArrowInvalid:
                    handle.seek(0)
                    pa.ipc.open_file(handle)  # reads the footer
    except Exception as error:
        raise ConfigError(f"{file}: not a readable {kind} file ({_first_line(error)})") from None


# --- JSON and JSON Lines --------------------------------------------------------------------------
# Read here rather than by datasets' JSON reader, which accepts invalid UTF-8 and fails later, when the row is read,
# and which drops empty lines unsaid: every record that cannot be a row becomes a bad row named by file and line.


Record = tuple[str, dict | None, str | None]  # (where, the row, or why it is not one)


def _read_json_files(files: list[str], limit: int | None) -> SourceRows:
    """The first ``limit`` records of the files (all without a limit); nothing past them is read."""
    rows: list[dict] = []
    unreadable: list[tuple[str, str]] = []
    records = itertools.chain.from_iterable(_json_records(Path(file)) for file in files)
    for where, row, problem in itertools.islice(records, limit):
        if problem is None:
            rows.append(row)
        else:
            unreadable.append((where, problem))
    return SourceRows(_dataset_from_json_rows(rows, files), unreadable)


def _json_records(path: Path) -> Iterator[Record]:
    """Each record of a JSON Lines file, or of a JSON document: an array of rows, or an object keyed by id
    (MathVista's testmini.json). A ``.json`` file holding JSON Lines is read as such, as datasets does."""
    if path.suffix == ".jsonl":
        return _json_line_records(path)
    raw = path.read_bytes()
    try:
        document = json.loads(raw.decode("utf-8-sig", errors="replace"))  # the shape first; bytes are checked below
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a whole first value, then more: one JSON value per line
            return _json_line_records(path)
        raise ConfigError(f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    return _json_document_records(path, raw, document)


def _json_line_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path} line {number}"
            try:
                yield where, _json_line_row(line, first=number == 1), None
            except BadRow as problem:
                yield where, None, str(problem)


def _json_line_row(line: bytes, first: bool) -> dict:
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")  # a byte-order mark may open the file
    except UnicodeDecodeError as error:
        column = len(line[: error.start].decode("utf-8-sig")) + 1  # everything before the first bad byte decodes
        raise BadRow(f"not valid UTF-8: byte 0x{line[error.start]:02x} at column {column}") from None
    if not text.strip():
        raise BadRow("empty line")
    try:
        value = json.loads(text.rstrip("\r\n"))  # so that an error's column is on this line, not the next
    except json.JSONDecodeError as error:
        raise BadRow(f"not valid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(value, dict):
        raise BadRow(f"a JSON {_json_type(value)}, not an object")
    return value


def _json_document_records(path: Path, raw: bytes, document: Any) -> Iterator[Record]:
    try:  # one document is read whole: a bad byte in it is the file's error, not a row's
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}: not valid UTF-8: byte 0x{raw[error.start]:02x} at line {line}") from None
    if isinstance(document, dict):
        items = ((f"{path} key {key!r}", value) for key, value in document.items())
    elif isinstance(document, list):
        items = ((f"{path} item {number}", value) for number, value in enumerate(document, start=1))
    else:
        raise ConfigError(f"{path}: a JSON {_json_type(document)}, not an array of rows or an object of rows")
    for where, value in items:
        if isinstance(value, dict):
            yield where, value, None
        else:
            yield where, None, f"a JSON {_json_type(value)}, not an object"


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _dataset_from_json_rows(rows: list[dict], files: list[str]):
    """One column per key any row has (a row without it holds null), types as pyarrow infers them."""
    import datasets
    import pyarrow as pa

    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
        culprit = next((key for key, values in columns.items() if not _one_arrow_type(values)), None)
        what = f"column {culprit!r} holds values of different types" if culprit else _first_line(error)
        raise ConfigError(f"{', '.join(files)}: {what} ({_first_line(error)})") from None


def _one_arrow_type(values: list) -> bool:
    import pyarrow as pa

    try:
        pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return False
    return True


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
    precision = (
        None if precision is None or (isinstance(precision, float) and math.isnan(precision)) else int(precision)
    )
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
