"""Writing the teacher-logit cache: one writer process appends shards and keeps its own manifest.

The layout is described in ``cache_format``. Every shard and manifest is written to a temporary file, fsynced
and renamed into place, and a writer rewrites its manifest after each shard, so a killed writer loses at most
its unflushed entries. Concurrent writers (one teacher process per rank) need distinct writer ids and then
never touch each other's files. A writer opened on an existing cache appends new shards under its id, skips
entries already cached, and extends its manifest.

A writer knows the teacher whose scores it adds (``teacher=``, or :meth:`TeacherCacheWriter.bind_teacher`
before the first add): it claims a cache that holds no scores yet for that teacher (``teacher.json``), and is
refused one that holds the scores of another teacher or of an unknown one, before it changes a byte of it. A
writer without a teacher (tests, benchmarks) writes only into a cache that records none.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm_post.fs import atomic_path
from vlm_post.teacher.cache import TeacherBatch
from vlm_post.teacher.cache_format import (
    _DTYPE_NAMES,
    DEFAULT_SHARD_TOKENS,
    FORMAT,
    TEACHER_FILE,
    VERSION,
    TeacherCacheError,
    TeacherFingerprintError,
    TeacherScores,
    TokenIds,
    _as_ids,
    _check_example_id,
    _digest,
    _dtype,
    _hash_shard,
    _Index,
    _read_index,
    _read_manifests,
    _Shard,
    check_cache_teacher,
    read_cache_teacher,
)
from vlm_post.teacher.fingerprint import TeacherFingerprint

# A writer id names its shard, manifest and lock files: keep it to characters that are safe in a file name.
_WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOW = "write this teacher's scores to another cache folder, or open the writer with the teacher that scored it"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the new one, never a partial one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _claim_cache(cache_dir: Path, teacher: TeacherFingerprint) -> None:
    """Create ``teacher.json`` for this teacher unless the cache has one. A hard link never replaces a file, so
    of two writers racing on a new cache one claims it and the other finds that claim (and checks it)."""
    path = cache_dir / TEACHER_FILE
    if path.exists():
        return
    try:
        with atomic_path(path, exclusive=True) as tmp:
            tmp.write_bytes(json.dumps(teacher.record(), indent=1).encode())
    except FileExistsError:
        pass  # another writer claimed it first


class TeacherCacheWriter:
    """Appends scored responses to a cache directory as ``<writer_id>-<seq>.safetensors`` shards.

    Use as a context manager (or call :meth:`close`). Each concurrent writer needs its own ``writer_id``
    (e.g. ``f"rank{rank}"``); reopening a writer id resumes it. A shard is written whenever ``shard_tokens``
    tokens are buffered, and on :meth:`flush` and :meth:`close`. ``teacher``: the fingerprint of the teacher
    whose scores this writer adds (see :meth:`bind_teacher`); a cache of another teacher is refused before the
    writer creates any file in it.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, k: int, dtype: str | torch.dtype = "float16",
                 writer_id: str = "main", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 teacher: TeacherFingerprint | None = None) -> None:  # fmt: skip
        self.cache_dir, self.k, self.dtype, self.writer_id = Path(cache_dir), int(k), _dtype(dtype), writer_id
        if self.k < 1 or shard_tokens < 1:
            raise TeacherCacheError(f"teacher cache needs k >= 1 and shard_tokens >= 1, got {k}, {shard_tokens}")
        if not isinstance(writer_id, str) or not _WRITER_ID.fullmatch(writer_id):
            raise TeacherCacheError(f"writer_id must match {_WRITER_ID.pattern}, got {writer_id!r}")
        self.shard_tokens, self.teacher = shard_tokens, None
        if teacher is not None:
            check_cache_teacher(self.cache_dir, teacher, _HOW)  # before the lock file: a refused cache is untouched
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Held open for the writer's lifetime: the flock lasts as long as the file is open.
        self._lock = open(self.cache_dir / f".lock-{writer_id}", "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TeacherCacheError(f"writer id {writer_id!r} is in use by another process on {self.cache_dir}; "
                                    "give each concurrent writer its own writer_id") from None  # fmt: skip
        try:
            k_old, dtype_old, shards, _ = _read_manifests(self.cache_dir)
            if k_old is not None and (k_old, dtype_old) != (self.k, _DTYPE_NAMES[self.dtype]):
                raise TeacherCacheError(f"teacher cache {self.cache_dir} holds k={k_old} {dtype_old} scores; this "
                                        f"writer was opened with k={self.k} {_DTYPE_NAMES[self.dtype]}")  # fmt: skip
            self._known = _Index()
            _read_index(self.cache_dir, shards, self._known, verify=True)
            if teacher is not None:
                self.bind_teacher(teacher)
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
        self._wrote = False  # whether this writer wrote a shard (a writer without a teacher rewrites no manifest else)
        self._closed = False

    def bind_teacher(self, teacher: TeacherFingerprint) -> None:
        """Tie the writer to the teacher whose scores it adds: claims the cache for it if it holds no scores
        yet, and raises :class:`TeacherFingerprintError` if it holds those of another teacher or of an unknown
        one (a cache from before the fingerprint). A writer opened before its teacher was known (the external
        scorer's) is bound before its first add."""
        if self.teacher is not None and self.teacher != teacher:
            raise TeacherCacheError(f"teacher cache writer {self.writer_id!r} is bound to teacher "
                                    f"{self.teacher.short}, not {teacher.short}")  # fmt: skip
        ours = (self.k, _DTYPE_NAMES[self.dtype])
        if (teacher.settings.get("top_k"), teacher.settings.get("cache_dtype")) != ours:
            raise TeacherCacheError(f"teacher fingerprint {teacher.short} is of top_k={teacher.settings.get('top_k')} "
                                    f"{teacher.settings.get('cache_dtype')} scores; writer {self.writer_id!r} writes "
                                    f"k={ours[0]} {ours[1]}")  # fmt: skip
        check_cache_teacher(self.cache_dir, teacher, _HOW)
        _claim_cache(self.cache_dir, teacher)
        check_cache_teacher(self.cache_dir, teacher, _HOW)  # a writer of another teacher may have claimed it first
        self.teacher = teacher

    def __enter__(self) -> TeacherCacheWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return self._known.holds_key(key)

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
        if self._known.holds(example_id, digest):
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

    def add_batch(self, keys: Sequence[tuple[str, TokenIds, TokenIds]], batch: TeacherBatch) -> int:
        """Buffer the rows of ``batch``, scored on any device in any float dtype, under their ``keys`` (example id,
        prompt ids, response ids): the one place scores go to the host and the cache's dtype. Returns how many
        were new."""
        if len(keys) != batch.mask.shape[0]:
            raise ValueError(f"add_batch got {len(keys)} keys for {batch.mask.shape[0]} rows of scores")
        host = batch.to("cpu")  # one transfer for the batch, not one per row
        return sum(self.add(*key, scores) for key, scores in zip(keys, host.entries()))

    def flush(self) -> None:
        """Write the buffered entries as one shard, then the writer's manifest."""
        if not self._pending:
            return
        self._check_may_write()
        name = f"{self.writer_id}-{self._seq:06d}.safetensors"
        path = self.cache_dir / name
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
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            sha, header_sha = _hash_shard(tmp)
            shard = _Shard(name, tmp.stat().st_size, sha, header_sha, len(self._pending),
                           int(lengths.sum()), self._manifest_path)  # fmt: skip
        self._seq += 1
        self._wrote = True
        self._shards.append(shard)
        self._pending, self._pending_tokens = [], 0
        self._write_manifest()

    def _check_may_write(self) -> None:
        """A writer without a teacher writes only into a cache that records none: scores never mix."""
        if self.teacher is not None:
            return
        recorded = read_cache_teacher(self.cache_dir)
        if recorded is not None:
            raise TeacherFingerprintError(
                f"teacher cache writer {self.writer_id!r} does not know its teacher, and {self.cache_dir} holds the "
                f"scores of teacher {recorded.describe()}: pass teacher= (or call bind_teacher) so that the scores "
                "of two teachers cannot mix"
            )

    def _write_manifest(self) -> None:
        manifest = {"format": FORMAT, "version": VERSION, "writer": self.writer_id, "k": self.k,
                    "dtype": _DTYPE_NAMES[self.dtype], "entries": sum(s.entries for s in self._shards),
                    "tokens": sum(s.tokens for s in self._shards),
                    "shards": [s.record() for s in self._shards]}  # fmt: skip
        if self.teacher is not None:
            manifest["teacher"] = self.teacher.digest
        _atomic_write(self._manifest_path, json.dumps(manifest, indent=1).encode())

    def close(self) -> None:
        """Flush, write the manifest and unlock. A writer bound to a teacher writes its manifest also when it
        added nothing (an empty cache is valid); one without a teacher that wrote no shard leaves the cache as
        it was (an external scorer refused at :meth:`bind_teacher`, even one reopening its own writer id)."""
        if self._closed:
            return
        try:
            self.flush()
            if self.teacher is not None or self._wrote:
                self._write_manifest()
        finally:
            self._closed = True
            self._lock.close()
