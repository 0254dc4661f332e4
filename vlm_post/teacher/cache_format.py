"""The on-disk format of the teacher-logit cache for on-policy distillation: layout, keys, errors.

A teacher process scores the student's sampled responses: for each response position the teacher's top-k
token ids and log-probs, and its log-prob of the token the student sampled. The student reads the scores
back to train on a reverse KL; a resumed run reuses them without re-scoring. ``cache_writer`` writes a cache,
``cache`` reads one; this module holds what both must agree on: the layout, the entry keys, the manifest and
shard-header parsing, and the errors.

Layout of a cache directory (format version 1):

- ``<writer>-<seq>.safetensors``: one shard, written by one writer, never modified afterwards. Tensors, with
  N tokens and E entries in the shard: ``topk_ids`` int32 [N, k], ``topk_logprobs`` [N, k] and
  ``sampled_logprobs`` [N] in the cache's dtype (float16 or bfloat16), ``response_ids`` int32 [N] (the scored
  response tokens, compared with the student's on every read), ``offsets`` int64 [E + 1] (entry e is tokens
  ``offsets[e]:offsets[e + 1]``). The safetensors metadata holds ``example_ids`` and ``digests`` (JSON lists,
  one item per entry) besides ``format``, ``version``, ``k``, ``dtype`` and ``writer``.
- ``manifest-<writer>.json``: one per writer: ``format``, ``version``, ``writer``, ``k``, ``dtype``,
  ``entries``, ``tokens`` and ``shards``, each shard with ``file``, ``bytes``, ``sha256`` (whole file),
  ``header_sha256`` (the 8-byte length and the JSON header), ``entries`` and ``tokens``. A reader takes the
  union of every ``manifest-*.json``; shards that no manifest lists (a writer killed between the shard and its
  manifest) are ignored.
- ``.lock-<writer>``: held (``flock``) by the live writer of that id, so two processes cannot share an id.
- ``teacher.json``: the fingerprint of the teacher and the scoring settings (``fingerprint``: the teacher's
  weights, config and tokenizer, top-k, dtypes) of every score in the cache. The first writer creates it
  (exclusively: of two writers racing on a new cache, one claims it and the other sees the claim), every
  manifest names its digest under ``teacher``, and a writer or run with another fingerprint is refused, so no
  cache holds the scores of two teachers. ``on_mismatch: rescore`` scores such a run into the namespace
  ``teacher-<first 12 hex digits>/``, a cache of its own inside the folder. A cache written before the
  fingerprint (scores, no ``teacher.json``) is refused by every writer that knows its teacher, since which
  teacher scored it is unknown; one that holds no scores yet is claimed.

An entry's key is its example id plus the first 128 bits of a sha256 over the id, the prompt token ids and
the response token ids (int32, length-prefixed). An example id holds any number of entries (the n samples of
a prompt, and its samples in later epochs); scores are a function of the tokens, so equal tokens share one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_post.errors import ConfigError
from vlm_post.teacher.fingerprint import TeacherFingerprint

FORMAT = "vlm_post.teacher_cache"
VERSION = 1
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DEFAULT_SHARD_TOKENS = 1 << 19  # ~100 MB per shard at k = 32
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MAX_HEADER = 1 << 30
TEACHER_FILE = "teacher.json"
NAMESPACE_PREFIX = "teacher-"
_INT_DTYPES = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64}
TokenIds = torch.Tensor | np.ndarray | Sequence[int]


class TeacherCacheError(ConfigError):
    """A teacher cache that is missing, corrupt, or does not match the request; the message names the file."""


class TeacherCacheMismatchError(TeacherCacheError):
    """The cache holds scores for this example id, but for other prompt or response tokens."""


class TeacherFingerprintError(TeacherCacheError):
    """The cache holds scores of another teacher (or of other scoring settings), or of an unknown one."""


@dataclass
class TeacherScores:
    """The teacher's scores of one response of T tokens (read back: views of the memory-mapped shard)."""

    topk_ids: torch.Tensor  # int32 [T, k]
    topk_logprobs: torch.Tensor  # float16 / bfloat16 [T, k]
    sampled_logprobs: torch.Tensor  # float16 / bfloat16 [T]: the teacher's log-prob of the student's token

    def __len__(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]


def _as_ids(ids: TokenIds, what: str) -> np.ndarray:
    """Token ids as a contiguous little-endian int32 array (a view of ``ids`` when it already is one)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in _INT_DTYPES or ids.dim() != 1:
            raise TeacherCacheError(f"{what} must be a 1-D tensor of integer token ids, got {ids.dtype} "
                                    f"{tuple(ids.shape)}")  # fmt: skip
        array = (ids if ids.device.type == "cpu" else ids.cpu()).numpy()  # integer tensors carry no grad
    else:
        array = np.asarray(ids)
        if array.size == 0 and array.ndim == 1:
            array = array.astype(np.int32)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise TeacherCacheError(f"{what} must be a 1-D sequence of integer token ids, got {array.dtype} "
                                    f"{array.shape}")  # fmt: skip
    return np.ascontiguousarray(array, dtype="<i4")  # ids are < 2**31; larger ones would wrap on both sides


def _digest(example_id: str, prompt: np.ndarray, response: np.ndarray) -> str:
    h = hashlib.sha256(b"vlm_post.teacher_cache/1\0")
    h.update(example_id.encode("utf-8") + b"\0")
    for ids in (prompt, response):
        h.update(struct.pack("<Q", ids.size))
        h.update(ids)
    return h.hexdigest()[:32]


def _check_example_id(example_id: str) -> None:
    if not isinstance(example_id, str) or not example_id:
        raise TeacherCacheError(f"example_id must be a non-empty string, got {example_id!r}")


def entry_key(example_id: str, prompt_ids: TokenIds, response_ids: TokenIds) -> str:
    """``"<example_id>|<32 hex digits>"``: the id and a hash of the id, prompt and response token ids."""
    _check_example_id(example_id)
    prompt, response = _as_ids(prompt_ids, "prompt_ids"), _as_ids(response_ids, "response_ids")
    return f"{example_id}|{_digest(example_id, prompt, response)}"


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise TeacherCacheError(f"teacher cache dtype must be float16 or bfloat16, got {dtype!r}")


@dataclass(frozen=True)
class _Shard:
    """One shard as its manifest records it; ``manifest`` is the file that lists it (not part of the record)."""

    file: str
    bytes: int
    sha256: str
    header_sha256: str
    entries: int
    tokens: int
    manifest: Path = field(compare=False)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "manifest"}


class _Index:
    """example id -> (digest, shard, entry) of its cached entries (usually one)."""

    def __init__(self) -> None:
        self.by_id: dict[str, Any] = {}  # a tuple, or a list of tuples for an id cached with several digests
        self.count = 0

    def entries(self, example_id: str) -> list[tuple[str, int, int]]:
        found = self.by_id.get(example_id)
        return [] if found is None else found if isinstance(found, list) else [found]

    def holds(self, example_id: str, digest: str) -> bool:
        return any(d == digest for d, _, _ in self.entries(example_id))

    def holds_key(self, key: str) -> bool:
        """Whether the index holds ``key``, an ``entry_key``."""
        example_id, _, digest = key.rpartition("|")
        return self.holds(example_id, digest)

    def add(self, example_id: str, digest: str, shard: int, entry: int) -> bool:
        present = self.entries(example_id)
        if any(d == digest for d, _, _ in present):
            return False
        self.by_id[example_id] = present + [(digest, shard, entry)] if present else (digest, shard, entry)
        self.count += 1
        return True


def _hash_shard(path: Path) -> tuple[str, str]:
    """(sha256 of the whole file, sha256 of its 8-byte header length and JSON header)."""
    whole, buf = hashlib.sha256(), bytearray(1 << 22)
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = head + (f.read(n) if n <= _MAX_HEADER else b"")
        whole.update(header)
        view = memoryview(buf)
        while got := f.readinto(buf):
            whole.update(view[:got])
    return whole.hexdigest(), hashlib.sha256(header).hexdigest()


def _check_size(path: Path, size: int, shard: _Shard) -> None:
    """Refuse a shard whose size differs from its manifest's record: it was truncated or rewritten."""
    if size != shard.bytes:
        raise TeacherCacheError(f"teacher cache shard {path} is truncated or was modified: {size} bytes, "
                                f"{shard.manifest.name} records {shard.bytes}")  # fmt: skip


def _check_manifest_teacher(path: Path, manifest: dict, recorded: TeacherFingerprint | None) -> None:
    """A manifest that lists shards names the cache's teacher: the scores of two teachers never mix."""
    named = manifest.get("teacher")
    if named is None and not manifest["shards"]:
        return  # an empty manifest from before the fingerprint: it holds no scores
    expected = recorded.digest if recorded is not None else None
    if named != expected:
        raise TeacherFingerprintError(
            f"teacher cache manifest {path} names teacher {str(named)[:12]}, but {path.parent / TEACHER_FILE} "
            f"records {str(expected)[:12]}: the cache mixes the scores of two teachers (copied in from another "
            "cache?); move this manifest and its shards to a cache folder of their own"
        )


def _read_manifests(cache_dir: Path) -> tuple[int | None, str | None, list[_Shard], TeacherFingerprint | None]:
    """(k, dtype name, shards, teacher) of every manifest in the directory; (None, None, [], teacher) if none."""
    k = dtype = None
    shards: list[_Shard] = []
    recorded = read_cache_teacher(cache_dir)
    for path in sorted(cache_dir.glob("manifest-*.json")):
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise TeacherCacheError(f"teacher cache manifest {path} is not a {FORMAT} manifest")
            if manifest.get("version") != VERSION:
                raise TeacherCacheError(f"teacher cache manifest {path} has format version {manifest.get('version')!r}"
                                        f"; this vlm_post reads version {VERSION}")  # fmt: skip
            if (k, dtype) not in ((None, None), (manifest["k"], manifest["dtype"])):
                raise TeacherCacheError(f"teacher cache manifest {path} holds k={manifest['k']} {manifest['dtype']} "
                                        f"scores, other manifests in {cache_dir} k={k} {dtype}")  # fmt: skip
            k, dtype = int(manifest["k"]), str(manifest["dtype"])
            _dtype(dtype)
            _check_manifest_teacher(path, manifest, recorded)
            shards += [_Shard(**s, manifest=path) for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, TeacherCacheError):
                raise
            raise TeacherCacheError(f"teacher cache manifest {path} is unreadable: {e!r}") from e
    return k, dtype, shards, recorded


def read_cache_teacher(cache_dir: str | os.PathLike) -> TeacherFingerprint | None:
    """The teacher that the cache's ``teacher.json`` records; None if it has none (new, or from before it)."""
    path = Path(cache_dir) / TEACHER_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return TeacherFingerprint.from_record(json.loads(text))
    except ValueError as err:
        raise TeacherCacheError(f"teacher cache {path} is corrupt: {err}") from None


def _scored_entries(cache_dir: Path) -> int:
    """Entries the cache's manifests list (0 for a folder that is not a cache yet)."""
    if not cache_dir.is_dir():
        return 0
    return sum(shard.entries for shard in _read_manifests(cache_dir)[2])


def namespace_dir(cache_dir: str | os.PathLike, teacher: TeacherFingerprint) -> Path:
    """``<cache_dir>/teacher-<short fingerprint>``: where ``on_mismatch: rescore`` keeps this teacher's scores."""
    return Path(cache_dir) / f"{NAMESPACE_PREFIX}{teacher.short}"


def rescore_dir(cache_dir: str | os.PathLike, teacher: TeacherFingerprint) -> Path:
    """The folder for this teacher's scores: ``cache_dir`` if it is this teacher's or holds no scores yet, else
    this teacher's namespace inside it (the scores already there are left as they are)."""
    root = Path(cache_dir)
    recorded = read_cache_teacher(root) if root.is_dir() else None
    if recorded == teacher or (recorded is None and not _scored_entries(root)):
        return root
    return namespace_dir(root, teacher)


def check_cache_teacher(cache_dir: str | os.PathLike, teacher: TeacherFingerprint, how: str) -> None:
    """Refuse a cache that holds the scores of another teacher, or scores of an unknown teacher (no
    ``teacher.json``); ``how`` ends the message: how to proceed. Reads only: a refused cache is left untouched."""
    root = Path(cache_dir)
    if not root.is_dir():
        return
    recorded = read_cache_teacher(root)
    if recorded is None:
        entries = _scored_entries(root)
        if entries:
            raise TeacherFingerprintError(
                f"teacher cache {root} holds {entries} scored responses but no teacher fingerprint (no {TEACHER_FILE}: "
                f"written before vlm_post recorded one), so which teacher scored them is unknown; this teacher is "
                f"{teacher.describe()}: {how}"
            )
        return
    if recorded != teacher:
        differing = ", ".join(teacher.differences(recorded))
        raise TeacherFingerprintError(
            f"teacher cache {root} holds the scores of teacher {recorded.describe()}, not of this teacher "
            f"{teacher.describe()} (this vs cached: {differing}): {how}"
        )


def _read_index(cache_dir: Path, shards: list[_Shard], index: _Index, verify: bool) -> None:
    """Add every shard's (example id, digest) pairs from its safetensors header; checks sizes, header hashes."""
    for i, shard in enumerate(shards):
        path = cache_dir / shard.file
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            msg = f"teacher cache shard {path}, listed in {shard.manifest.name}, is missing"
            raise TeacherCacheError(msg) from None
        _check_size(path, size, shard)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = head + f.read(n) if 0 <= n <= min(_MAX_HEADER, size - 8) else b""
        if verify and hashlib.sha256(header).hexdigest() != shard.header_sha256:
            raise TeacherCacheError(f"teacher cache shard {path} is corrupt: its header's sha256 differs from "
                                    f"the one {shard.manifest.name} records")  # fmt: skip
        try:
            meta = json.loads(header[8:])["__metadata__"]
            ids, digests = json.loads(meta["example_ids"]), json.loads(meta["digests"])
            if len(ids) != shard.entries or len(digests) != shard.entries:
                raise ValueError(f"{len(ids)} example ids for {shard.entries} entries")
        except (ValueError, KeyError, TypeError) as e:
            raise TeacherCacheError(f"teacher cache shard {path} has a corrupt header: {e!r}") from e
        for entry, (example_id, digest) in enumerate(zip(ids, digests)):
            index.add(example_id, digest, i, entry)
