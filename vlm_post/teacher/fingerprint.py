"""Which teacher scored a cache: a fingerprint of the teacher model and of the settings it scored with.

A teacher-logit cache entry is keyed by the example and the student's tokens, not by the teacher, so scores of
one teacher would be reused silently for another. The cache therefore records the fingerprint of the teacher
that wrote it (``cache_format``: ``teacher.json``), and a writer or a run with another fingerprint is refused.

The fingerprint has four parts, each a sha256, and its digest is the sha256 of the four:

- ``weights``: see :func:`weights_fingerprint`: every weight file's name and size, small files byte for byte,
  large ones by their safetensors header and sampled bytes of every tensor;
- ``config``: ``config.json``, parsed, without ``_name_or_path`` and ``transformers_version`` (which a re-save
  changes without changing the model);
- ``tokenizer``: the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
  ``merges.txt``, ``tokenizer.model``, ``special_tokens_map.json``, ``added_tokens.json``), byte for byte;
- ``settings``: what changes the scores besides the model: ``top_k``, the cache's ``cache_dtype``, the
  parameter ``dtype`` the teacher runs in (``auto`` resolved to the one its config names), the temperature of
  the teacher's log-probs (always 1: the student's sampling temperature applies to the student's side of the
  loss) and ``scoring``, the version of the scoring code, bumped when it changes what it computes.

Left out on purpose, because they change scores only by the rounding of the same computation: the device, the
attention kernel, the log-prob chunk size and the library versions. The folder's path is left out too (kept as
``source``, for messages only): a copied or moved teacher is the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_post.errors import ConfigError

SCORING_VERSION = 1  # bump when scoring.py changes what the teacher's scores are
FULL_HASH_BYTES = 64 << 20  # weight files up to this size are hashed whole (the tiny models, index files)
SAMPLE_BYTES = 4096  # bytes read at each sampled place of a large file
SAMPLES_PER_TENSOR = 4  # evenly spaced, the tensor's first and last bytes among them
SAMPLES_PER_FILE = 64  # for a large weight file that is not safetensors (no tensor table to follow)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json")  # fmt: skip
_CONFIG_VOLATILE = ("_name_or_path", "transformers_version")
_PARTS = ("weights", "config", "tokenizer", "settings")


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, eq=False)
class TeacherFingerprint:
    """A teacher and its scoring settings, as the sha256 of four parts; equal when their digests are equal."""

    weights: str
    config: str
    tokenizer: str
    settings: dict[str, Any]
    source: str = field(default="")  # where the teacher was read from: for messages, not part of the digest

    @property
    def digest(self) -> str:
        return hashlib.sha256(_canonical({p: getattr(self, p) for p in _PARTS})).hexdigest()

    @property
    def short(self) -> str:
        """The first 12 hex digits of the digest: how messages and namespace folders name the teacher."""
        return self.digest[:12]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TeacherFingerprint) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def differences(self, other: TeacherFingerprint) -> list[str]:
        """What differs from ``other``: ``weights``, ``config``, ``tokenizer`` and ``<setting>=<ours> vs <theirs>``."""
        found = [p for p in ("weights", "config", "tokenizer") if getattr(self, p) != getattr(other, p)]
        for key in sorted(set(self.settings) | set(other.settings)):
            if self.settings.get(key) != other.settings.get(key):
                found.append(f"{key}={self.settings.get(key)} vs {other.settings.get(key)}")
        return found

    def describe(self) -> str:
        """``<short> (<source>)``, as messages name a teacher."""
        return f"{self.short} ({self.source or 'source not recorded'})"

    def record(self) -> dict[str, Any]:
        """The JSON a cache stores: the digest, its parts and the source."""
        return {"fingerprint": self.digest, **{p: getattr(self, p) for p in _PARTS}, "source": self.source}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TeacherFingerprint:
        """Parse :meth:`record`; ValueError if a part is missing or the digest does not match its parts."""
        if not isinstance(record, dict) or any(p not in record for p in (*_PARTS, "fingerprint")):
            raise ValueError(f"a teacher fingerprint needs {', '.join(_PARTS)} and fingerprint")
        if not isinstance(record["settings"], dict):
            raise ValueError("its settings are not a mapping")  # noqa: TRY004 (the reader reports ValueErrors)
        fingerprint = cls(*(record[p] for p in _PARTS), source=str(record.get("source", "")))
        if fingerprint.digest != record["fingerprint"]:
            raise ValueError(f"its fingerprint {record['fingerprint']!r} is not the sha256 of its parts")
        return fingerprint


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _spaced(start: int, end: int, count: int) -> list[int]:
    """``count`` evenly spaced offsets of SAMPLE_BYTES reads in [start, end), the first and last included."""
    last = end - SAMPLE_BYTES
    if count < 2 or last <= start:
        return [start]
    return sorted({start + (last - start) * i // (count - 1) for i in range(count)})


def _sampled_safetensors(path: Path) -> str:
    """sha256 of a safetensors file's header and of SAMPLES_PER_TENSOR sampled places in every tensor's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        header = f.read(struct.unpack("<Q", head)[0]) if len(head) == 8 else b""
        h.update(head + header)
        try:
            spans = {k: tuple(v["data_offsets"]) for k, v in json.loads(header).items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"teacher weight file {path} is not a readable safetensors file: {err!r}") from None
        for name in sorted(spans):
            start, end = spans[name]
            small = end - start <= SAMPLE_BYTES * SAMPLES_PER_TENSOR  # read whole: norms, biases, small matrices
            for offset in [start] if small else _spaced(start, end, SAMPLES_PER_TENSOR):
                f.seek(8 + len(header) + offset)
                h.update(f.read(end - start if small else SAMPLE_BYTES))
    return h.hexdigest()


def _sampled_file(path: Path, size: int) -> str:
    """sha256 of SAMPLES_PER_FILE evenly spaced places of a file (a large pickle: no tensor table to follow)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in _spaced(0, size, SAMPLES_PER_FILE):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _weight_file_digest(path: Path, size: int) -> str:
    if size <= FULL_HASH_BYTES:
        return _sha256_file(path)
    return _sampled_safetensors(path) if path.name.endswith(".safetensors") else _sampled_file(path, size)


def weights_fingerprint(model_dir: str | Path) -> str:
    """A cheap sha256 of a model's weights: changed by any retraining, without reading a 72B model's 145 GB.

    Covers, for every weight file in the folder (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth`` and the
    ``*.index.json`` shard maps), its name and size, and:

    - a file of up to FULL_HASH_BYTES (64 MiB): every byte;
    - a larger safetensors file: its whole header (every tensor's name, dtype, shape and offsets, and the
      metadata) and SAMPLES_PER_TENSOR (4) reads of SAMPLE_BYTES (4 KiB) evenly spaced over each tensor's bytes,
      its first and last 4 KiB included; a tensor of up to 16 KiB is read whole. A 72B model has some 1,500
      tensors: about 25 MB read, of 145 GB;
    - a larger file of another format: 64 reads of 4 KiB evenly spaced over the file.

    Would miss a change to a large file that keeps its size and header and touches none of the sampled bytes:
    an edit of some values in the middle of a large tensor (a few rows of the embedding), or bytes rewritten to
    defeat it. Training or merging an adapter changes nearly every value of the tensors it touches, so their
    sampled bytes too, and converting the dtype changes the header: those are caught. Files outside the folder's
    top level are not looked at.
    """
    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not any(not p.name.endswith(".index.json") for p in files):
        raise ConfigError(f"teacher {folder} has no weight files (*.safetensors, *.bin) to fingerprint")
    h = hashlib.sha256(b"vlm_post.teacher_weights/1\0")
    for path in files:
        size = path.stat().st_size
        h.update(_canonical([path.name, size, _weight_file_digest(path, size)]))
    return h.hexdigest()


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"teacher {model_dir}: cannot read config.json to fingerprint it: {err}") from None


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config, canonical JSON, without the keys a re-save changes (``_CONFIG_VOLATILE``)."""
    return hashlib.sha256(_canonical({k: v for k, v in config.items() if k not in _CONFIG_VOLATILE})).hexdigest()


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the names and sha256s of the tokenizer files the folder has (``_TOKENIZER_FILES``)."""
    folder = Path(model_dir)
    present = [(name, _sha256_file(folder / name)) for name in _TOKENIZER_FILES if (folder / name).is_file()]
    return hashlib.sha256(_canonical(present)).hexdigest()


def effective_dtype(dtype: str, config: dict[str, Any]) -> str:
    """The parameter dtype the teacher runs in: ``auto`` is the dtype its config names (the saved one)."""
    if dtype != "auto":
        return dtype
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


def fingerprint_teacher(model_dir: str | Path, *, top_k: int, cache_dtype: str, dtype: str = "auto",
                        source: str | None = None) -> TeacherFingerprint:  # fmt: skip
    """The fingerprint of the teacher in ``model_dir`` (a local folder) scoring with these settings."""
    folder = Path(model_dir)
    config = _config(folder)
    settings = {"top_k": int(top_k), "cache_dtype": str(cache_dtype), "dtype": effective_dtype(dtype, config),
                "temperature": 1.0, "scoring": SCORING_VERSION}  # fmt: skip
    return TeacherFingerprint(weights_fingerprint(folder), config_fingerprint(config), tokenizer_fingerprint(folder),
                              settings, source=str(source if source is not None else folder))  # fmt: skip


def local_model_dir(model_name_or_path: str) -> Path:
    """The local folder of a model: the path itself, or the Hugging Face cache's snapshot of a hub id."""
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_name_or_path, "config.json", local_files_only=True)).parent
    except (OSError, ValueError) as err:
        raise ConfigError(f"teacher {model_name_or_path!r}: not in the local Hugging Face cache, so it cannot be "
                          f"fingerprinted: {err}") from None  # fmt: skip
