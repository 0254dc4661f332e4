"""The teacher-logit cache for on-policy distillation: sharded, memory-mapped, checksummed files.

A teacher process scores the student's sampled responses: for each response position the teacher's top-k
token ids and log-probs, and its log-prob of the token the student sampled. The student reads the scores
back to train on a reverse KL; a resumed run reuses them without re-scoring.

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

Every shard and manifest is written to a temporary file, fsynced and renamed into place, and a writer rewrites
its manifest after each shard, so a killed writer loses at most its unflushed entries. Concurrent writers (one
teacher process per rank) need distinct writer ids and then never touch each other's files. A writer opened on
an existing cache appends new shards under its id, skips entries already cached, and extends its manifest.

An entry's key is its example id plus the first 128 bits of a sha256 over the id, the prompt token ids and
the response token ids (int32, length-prefixed). An example id holds any number of entries (the n samples of
a prompt, and its samples in later epochs); scores are a function of the tokens, so equal tokens share one.
A lookup of tokens the cache does not hold is a miss (``get`` returns None), or, with ``strict=True`` (for
ids that name one rollout, as the files of ``tools/score_teacher.py`` do), a
:class:`TeacherCacheMismatchError` when the id is cached for other tokens. An entry found by its key whose
stored response tokens differ from the request (a hash collision or a corrupt index) always raises; a shard whose
size differs from its manifest's is refused when the cache is opened, and one whose sha256 differs before its
first scores are returned (once per shard per process; ``verify=False`` skips the sha256 checks).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_post.errors import ConfigError

FORMAT = "vlm_post.teacher_cache"
VERSION = 1
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DEFAULT_SHARD_TOKENS = 1 << 19  # ~100 MB per shard at k = 32
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_HEADER = 1 << 30
_INT_DTYPES = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64}
TokenIds = Union[torch.Tensor, np.ndarray, Sequence[int]]


class TeacherCacheError(ConfigError):
    """A teacher cache that is missing, corrupt, or does not match the request; the message names the file."""


class TeacherCacheMismatchError(TeacherCacheError):
    """The cache holds scores for this example id, but for other prompt or response tokens."""


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


@dataclass
class TeacherBatch:
    """Scores of R responses right-padded to T tokens; padding has ids 0, log-probs 0 and mask False."""

    topk_ids: torch.Tensor  # int32 [R, T, k]
    topk_logprobs: torch.Tensor  # [R, T, k]
    sampled_logprobs: torch.Tensor  # [R, T]
    mask: torch.Tensor  # bool [R, T]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherBatch:
        return TeacherBatch(*(t.to(device, non_blocking=non_blocking) for t in (
            self.topk_ids, self.topk_logprobs, self.sampled_logprobs, self.mask)))  # fmt: skip


def pad_scores(scores: Sequence[TeacherScores], length: int | None = None) -> TeacherBatch:
    """Stack responses into a right-padded batch of ``length`` tokens (default: the longest response)."""
    if not scores:
        raise ValueError("pad_scores needs at least one TeacherScores")
    k, dtype = scores[0].k, scores[0].topk_logprobs.dtype
    if any(s.k != k or s.topk_logprobs.dtype != dtype for s in scores):
        raise ValueError("pad_scores got scores with different k or dtype")
    lengths = [len(s) for s in scores]
    batch = _padded(len(scores), _pad_length(lengths, length), k, dtype, lengths)
    for i, s in enumerate(scores):
        batch.topk_ids[i, : lengths[i]] = s.topk_ids
        batch.topk_logprobs[i, : lengths[i]] = s.topk_logprobs
        batch.sampled_logprobs[i, : lengths[i]] = s.sampled_logprobs
    return batch


def _pad_length(lengths: list[int], length: int | None) -> int:
    longest = max(lengths, default=0)
    if length is not None and length < longest:
        raise ValueError(f"a response has {longest} scored tokens, more than length={length}")
    return longest if length is None else length


def _padded(rows: int, length: int, k: int, dtype: torch.dtype, lengths: list[int]) -> TeacherBatch:
    """An all-padding batch (zeros) with the mask of these lengths."""
    mask = torch.arange(length) < torch.tensor(lengths, dtype=torch.int64).reshape(-1, 1)
    return TeacherBatch(torch.zeros(rows, length, k, dtype=torch.int32), torch.zeros(rows, length, k, dtype=dtype),
                        torch.zeros(rows, length, dtype=dtype), mask)  # fmt: skip


def _bits(*tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
    """numpy views of CPU tensors; 16-bit floats as int16 (numpy has no bfloat16), for cheap slice copies."""
    return tuple((t.view(torch.int16) if t.element_size() == 2 else t).numpy() for t in tensors)


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

    def add(self, example_id: str, digest: str, shard: int, entry: int) -> bool:
        present = self.entries(example_id)
        if any(d == digest for d, _, _ in present):
            return False
        self.by_id[example_id] = present + [(digest, shard, entry)] if present else (digest, shard, entry)
        self.count += 1
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


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


_VERIFIED: set[tuple[str, int, int, str]] = set()  # shards whose sha256 this process has checked
_VERIFIED_LOCK = threading.Lock()


def _verify(path: Path, shard: _Shard) -> None:
    stat = os.stat(path)
    if stat.st_size != shard.bytes:
        raise TeacherCacheError(f"teacher cache shard {path} is truncated or was modified: {stat.st_size} bytes, "
                                f"{shard.manifest.name} records {shard.bytes}")  # fmt: skip
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, shard.sha256)
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return
    digest, _ = _hash_shard(path)
    if digest != shard.sha256:
        raise TeacherCacheError(
            f"teacher cache shard {path} is corrupt: its sha256 is {digest}, {shard.manifest.name} records "
            f"{shard.sha256}; re-score into a new cache (or delete the shard and its record in the manifest)"
        )
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)


def _read_manifests(cache_dir: Path) -> tuple[int | None, str | None, list[_Shard]]:
    """(k, dtype name, shards) of every manifest in the directory; (None, None, []) when there is none."""
    k = dtype = None
    shards: list[_Shard] = []
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
            shards += [_Shard(**s, manifest=path) for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, TeacherCacheError):
                raise
            raise TeacherCacheError(f"teacher cache manifest {path} is unreadable: {e!r}") from e
    return k, dtype, shards


def _read_index(cache_dir: Path, shards: list[_Shard], index: _Index, verify: bool) -> None:
    """Add every shard's (example id, digest) pairs from its safetensors header; checks sizes, header hashes."""
    for i, shard in enumerate(shards):
        path = cache_dir / shard.file
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            msg = f"teacher cache shard {path}, listed in {shard.manifest.name}, is missing"
            raise TeacherCacheError(msg) from None
        if size != shard.bytes:
            raise TeacherCacheError(f"teacher cache shard {path} is truncated or was modified: {size} bytes, "
                                    f"{shard.manifest.name} records {shard.bytes}")  # fmt: skip
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


class TeacherCacheWriter:
    """Appends scored responses to a cache directory as ``<writer_id>-<seq>.safetensors`` shards.

    Use as a context manager (or call :meth:`close`). Each concurrent writer needs its own ``writer_id``
    (e.g. ``f"rank{rank}"``); reopening a writer id resumes it. A shard is written whenever ``shard_tokens``
    tokens are buffered, and on :meth:`flush` and :meth:`close`.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, k: int, dtype: str | torch.dtype = "float16",
                 writer_id: str = "main", shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:  # fmt: skip
        self.cache_dir, self.k, self.dtype, self.writer_id = Path(cache_dir), int(k), _dtype(dtype), writer_id
        if self.k < 1 or shard_tokens < 1:
            raise TeacherCacheError(f"teacher cache needs k >= 1 and shard_tokens >= 1, got {k}, {shard_tokens}")
        if not isinstance(writer_id, str) or not _WRITER_ID.fullmatch(writer_id):
            raise TeacherCacheError(f"writer_id must match {_WRITER_ID.pattern}, got {writer_id!r}")
        self.shard_tokens = shard_tokens
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.cache_dir / f".lock-{writer_id}", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TeacherCacheError(f"writer id {writer_id!r} is in use by another process on {self.cache_dir}; "
                                    "give each concurrent writer its own writer_id") from None  # fmt: skip
        try:
            k_old, dtype_old, shards = _read_manifests(self.cache_dir)
            if k_old is not None and (k_old, dtype_old) != (self.k, _DTYPE_NAMES[self.dtype]):
                raise TeacherCacheError(f"teacher cache {self.cache_dir} holds k={k_old} {dtype_old} scores; this "
                                        f"writer was opened with k={self.k} {_DTYPE_NAMES[self.dtype]}")  # fmt: skip
            self._known = _Index()
            _read_index(self.cache_dir, shards, self._known, verify=True)
        except BaseException:
            self._lock.close()
            raise
        self._manifest_path = self.cache_dir / f"manifest-{writer_id}.json"
        self._shards = [s for s in shards if s.manifest == self._manifest_path]
        taken = [int(m.group(1)) for p in self.cache_dir.iterdir()
                 if (m := re.fullmatch(rf"{re.escape(writer_id)}-(\d+)\.safetensors", p.name))]  # fmt: skip
        self._seq = max(taken, default=-1) + 1  # never reuse a name, not even an orphan shard's
        self._pending: list[tuple[str, str, torch.Tensor, TeacherScores]] = []
        self._pending_tokens = 0
        self._closed = False

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        example_id, _, digest = key.rpartition("|")
        return any(d == digest for d, _, _ in self._known.entries(example_id))

    def __len__(self) -> int:
        """Entries in the cache: those there when the writer opened, plus those added since."""
        return self._known.count

    def add(self, example_id: str, prompt_ids: TokenIds, response_ids: TokenIds, scores: TeacherScores) -> bool:
        """Buffer one scored response; False (and nothing written) if the cache already holds it."""
        if self._closed:
            raise TeacherCacheError(f"teacher cache writer {self.writer_id!r} on {self.cache_dir} is closed")
        _check_example_id(example_id)
        response = _as_ids(response_ids, "response_ids")
        digest = _digest(example_id, _as_ids(prompt_ids, "prompt_ids"), response)
        if any(d == digest for d, _, _ in self._known.entries(example_id)):
            return False
        t, k = response.size, self.k
        ids, logprobs, sampled = scores.topk_ids, scores.topk_logprobs, scores.sampled_logprobs
        if tuple(ids.shape) != (t, k) or tuple(logprobs.shape) != (t, k) or tuple(sampled.shape) != (t,):
            raise TeacherCacheError(f"scores for {example_id!r} ({t} response tokens, k={k}) have shapes "
                                    f"{tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(sampled.shape)}; "
                                    f"expected ({t}, {k}), ({t}, {k}), ({t},)")  # fmt: skip
        if ids.is_floating_point() or not logprobs.is_floating_point() or not sampled.is_floating_point():
            raise TeacherCacheError(f"scores for {example_id!r}: topk_ids must be integers, log-probs floats")
        scores = TeacherScores(ids.to("cpu", torch.int32, copy=True), logprobs.to("cpu", self.dtype, copy=True),
                               sampled.to("cpu", self.dtype, copy=True))  # fmt: skip
        if scores.topk_logprobs.isnan().any() or scores.sampled_logprobs.isnan().any():
            raise TeacherCacheError(f"scores for {example_id!r} hold NaN log-probs")
        self._known.add(example_id, digest, -1, -1)
        self._pending.append((example_id, digest, torch.from_numpy(response.copy()), scores))
        self._pending_tokens += t
        if self._pending_tokens >= self.shard_tokens:
            self.flush()
        return True

    def flush(self) -> None:
        """Write the buffered entries as one shard, then the writer's manifest."""
        if not self._pending:
            return
        name = f"{self.writer_id}-{self._seq:06d}.safetensors"
        path, tmp = self.cache_dir / name, self.cache_dir / f".{name}.{os.getpid()}.tmp"
        lengths = torch.tensor([len(p[3]) for p in self._pending], dtype=torch.int64)
        tensors = {
            "topk_ids": torch.cat([p[3].topk_ids for p in self._pending]),
            "topk_logprobs": torch.cat([p[3].topk_logprobs for p in self._pending]),
            "sampled_logprobs": torch.cat([p[3].sampled_logprobs for p in self._pending]),
            "response_ids": torch.cat([p[2] for p in self._pending]),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        }
        metadata = {"format": FORMAT, "version": str(VERSION), "k": str(self.k), "writer": self.writer_id,
                    "dtype": _DTYPE_NAMES[self.dtype], "example_ids": json.dumps([p[0] for p in self._pending]),
                    "digests": json.dumps([p[1] for p in self._pending])}  # fmt: skip
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            sha, header_sha = _hash_shard(tmp)
            shard = _Shard(name, tmp.stat().st_size, sha, header_sha, len(self._pending),
                           int(lengths.sum()), self._manifest_path)  # fmt: skip
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._seq += 1
        self._shards.append(shard)
        self._pending, self._pending_tokens = [], 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {"format": FORMAT, "version": VERSION, "writer": self.writer_id, "k": self.k,
                    "dtype": _DTYPE_NAMES[self.dtype], "entries": sum(s.entries for s in self._shards),
                    "tokens": sum(s.tokens for s in self._shards),
                    "shards": [s.record() for s in self._shards]}  # fmt: skip
        _atomic_write(self._manifest_path, json.dumps(manifest, indent=1).encode())

    def close(self) -> None:
        """Flush, write the manifest (also when nothing was added: an empty cache is valid) and unlock."""
        if self._closed:
            return
        try:
            self.flush()
            self._write_manifest()
        finally:
            self._closed = True
            self._lock.close()


class _ShardData:
    __slots__ = ("topk_ids", "topk_logprobs", "sampled_logprobs", "response_ids", "offsets", "arrays")
    _TENSORS = __slots__[:5]


class TeacherCache:
    """Reads a cache directory: the union of its ``manifest-*.json``, shards memory-mapped on first use.

    ``verify`` (default on) checks each shard's header hash when the cache is opened and the whole shard's
    sha256 before its first scores are returned, once per shard per process. Sizes are always checked.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, verify: bool = True) -> None:
        self.cache_dir, self.verify = Path(cache_dir), verify
        self._data: dict[int, _ShardData] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the manifests, picking up shards that writers have added since."""
        if not self.cache_dir.is_dir():
            raise TeacherCacheError(f"teacher cache {self.cache_dir} does not exist")
        k, dtype, shards = _read_manifests(self.cache_dir)
        if k is None:
            raise TeacherCacheError(f"{self.cache_dir} is not a teacher cache: it has no manifest-*.json "
                                    "(a TeacherCacheWriter writes one when it flushes or closes)")  # fmt: skip
        index = _Index()
        _read_index(self.cache_dir, shards, index, self.verify)
        old = {s: self._data[i] for i, s in enumerate(getattr(self, "_shards", [])) if i in self._data}
        self.k, self.dtype, self._shards, self._index = k, _dtype(dtype), shards, index
        self._data = {i: old[s] for i, s in enumerate(shards) if s in old}

    def __len__(self) -> int:
        return self._index.count

    def __contains__(self, key: str) -> bool:
        example_id, _, digest = key.rpartition("|")
        return any(d == digest for d, _, _ in self._index.entries(example_id))

    def keys(self) -> Iterator[str]:
        for example_id in self._index.by_id:
            yield from (f"{example_id}|{d}" for d, _, _ in self._index.entries(example_id))

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self._shards)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def _open(self, i: int) -> _ShardData:
        data = self._data.get(i)
        if data is not None:
            return data
        shard = self._shards[i]
        path = self.cache_dir / shard.file
        if self.verify:
            _verify(path, shard)
        data = _ShardData()
        try:
            with safe_open(str(path), framework="pt") as f:  # memory-mapped: no bytes are read here
                for name in _ShardData._TENSORS:
                    setattr(data, name, f.get_tensor(name))
            n, e = shard.tokens, shard.entries
            expected = {"topk_ids": ((n, self.k), torch.int32), "topk_logprobs": ((n, self.k), self.dtype),
                        "sampled_logprobs": ((n,), self.dtype), "response_ids": ((n,), torch.int32),
                        "offsets": ((e + 1,), torch.int64)}  # fmt: skip
            for name, (shape, dtype) in expected.items():
                t = getattr(data, name)
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            offsets = data.offsets.tolist()
            if offsets[0] != 0 or offsets[-1] != n or any(a > b for a, b in zip(offsets, offsets[1:])):
                raise ValueError("its offsets are not a partition of its tokens")
            data.offsets = offsets
            data.response_ids = data.response_ids.numpy()  # compared as bytes on every read
            data.arrays = _bits(data.topk_ids, data.topk_logprobs, data.sampled_logprobs)
        except Exception as err:
            raise TeacherCacheError(f"teacher cache shard {path} cannot be read: {err}") from err
        self._data[i] = data
        return data

    def get(self, example_id: str, prompt_ids: TokenIds, response_ids: TokenIds, strict: bool = False
            ) -> TeacherScores | None:  # fmt: skip
        """The teacher's scores of this response, or None if the cache does not hold these tokens.

        Raises :class:`TeacherCacheMismatchError` if the entry's stored tokens differ from the request, or,
        with ``strict``, if the example id is cached only for other tokens; and
        :class:`TeacherCacheError` for a corrupt shard. The tensors are views of the memory-mapped shard
        (copy-on-write: writing to them never changes the file).
        """
        found = self._locate(example_id, prompt_ids, response_ids, strict)
        if found is None:
            return None
        data, start, end = found
        return TeacherScores(data.topk_ids[start:end], data.topk_logprobs[start:end], data.sampled_logprobs[start:end])

    def _locate(self, example_id: str, prompt_ids: TokenIds, response_ids: TokenIds, strict: bool = False
                ) -> tuple[Any, int, int] | None:  # fmt: skip
        """(shard data, start, end) of the entry, None if it is not cached; raises as :meth:`get`."""
        present = self._index.entries(example_id)
        if not present:
            _check_example_id(example_id)
            return None
        response = _as_ids(response_ids, "response_ids")
        digest = _digest(example_id, _as_ids(prompt_ids, "prompt_ids"), response)
        for d, i, entry in present:
            if d == digest:
                data = self._open(i)
                start, end = data.offsets[entry], data.offsets[entry + 1]
                if end - start != response.size or data.response_ids[start:end].tobytes() != response.tobytes():
                    raise TeacherCacheMismatchError(
                        f"teacher cache shard {self.cache_dir / self._shards[i].file}: the entry for example id "
                        f"{example_id!r} holds other response tokens than this rollout, under the same key"
                    )
                return data, start, end
        if not strict:
            return None
        for _, i, _ in present:
            self._open(i)  # a corrupt shard is reported as such, not as a mismatch
        files = ", ".join(sorted({self._shards[i].file for _, i, _ in present}))
        raise TeacherCacheMismatchError(
            f"teacher cache {self.cache_dir} holds scores for example id {example_id!r} (shard {files}), but for "
            f"other prompt or response tokens than this rollout ({response.size} response tokens); the rollout "
            "differs from the one the teacher scored, so its scores cannot be reused"
        )

    def require(self, example_id: str, prompt_ids: TokenIds, response_ids: TokenIds) -> TeacherScores:
        """Like :meth:`get` with ``strict``, but a missing example id raises :class:`TeacherCacheError`."""
        scores = self.get(example_id, prompt_ids, response_ids, strict=True)
        if scores is None:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} has no scores for example id {example_id!r} "
                                    f"({len(self)} entries in {self.num_shards} shards)")  # fmt: skip
        return scores

    def require_batch(self, example_ids: Sequence[str], prompt_ids: Sequence[TokenIds],
                      response_ids: Sequence[TokenIds], length: int | None = None) -> TeacherBatch:  # fmt: skip
        """Scores of several responses, right-padded as by :func:`pad_scores`; every one must be cached."""
        if not len(example_ids) == len(prompt_ids) == len(response_ids):
            raise ValueError("require_batch needs as many prompts and responses as example ids")
        found = [self._locate(*request, strict=True) for request in zip(example_ids, prompt_ids, response_ids)]
        missing = [e for e, f in zip(example_ids, found) if f is None]
        if missing:
            raise TeacherCacheError(f"teacher cache {self.cache_dir} has no scores for {len(missing)} of "
                                    f"{len(example_ids)} example ids: {', '.join(map(repr, missing[:5]))}"
                                    f"{' ...' if len(missing) > 5 else ''}")  # fmt: skip
        lengths = [end - start for _, start, end in found]
        batch = _padded(len(found), _pad_length(lengths, length), self.k, self.dtype, lengths)
        out = _bits(batch.topk_ids, batch.topk_logprobs, batch.sampled_logprobs)
        for row, (data, start, end) in enumerate(found):  # numpy copies: a few microseconds per response
            for dst, src in zip(out, data.arrays):
                dst[row, : end - start] = src[start:end]
        return batch
