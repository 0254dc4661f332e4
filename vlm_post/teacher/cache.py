"""Reading the teacher-logit cache: lookups by entry key, shard checks, and right-padded batches of scores.

The layout is described in ``cache_format``. A lookup of tokens the cache does not hold is a miss (``get``
returns None), or, with ``strict=True`` (for ids that name one rollout, as the files of
``tools/score_teacher.py`` do), a :class:`TeacherCacheMismatchError` when the id is cached for other tokens.
An entry found by its key whose stored response tokens differ from the request (a hash collision or a corrupt
index) always raises; a shard whose size differs from its manifest's is refused when the cache is opened, and
one whose sha256 differs before its first scores are returned (once per shard per process; ``verify=False``
skips the sha256 checks).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from vlm_post.teacher.cache_format import (
    TeacherCacheError,
    TeacherCacheMismatchError,
    TeacherScores,
    TokenIds,
    _as_ids,
    _check_example_id,
    _check_size,
    _digest,
    _dtype,
    _hash_shard,
    _Index,
    _read_index,
    _read_manifests,
    _Shard,
)


@dataclass
class TeacherBatch:
    """The teacher's scores of R responses of T positions, the one form they take from the teacher to the loss.

    Padding has ids 0, log-probs 0 and mask False. Where it lives and its dtype are its source's: the in-process
    teacher's fp32 on the device; a cache's 16-bit floats, read on the host.
    """

    topk_ids: torch.Tensor  # int32 [R, T, k]
    topk_logprobs: torch.Tensor  # [R, T, k]
    sampled_logprobs: torch.Tensor  # [R, T]
    mask: torch.Tensor  # bool [R, T]

    @classmethod
    def zeros(cls, rows: int, length: int, k: int, dtype: torch.dtype, device: torch.device | str) -> TeacherBatch:
        """All padding."""
        return cls(torch.zeros(rows, length, k, dtype=torch.int32, device=device),
                   torch.zeros(rows, length, k, dtype=dtype, device=device),
                   torch.zeros(rows, length, dtype=dtype, device=device),
                   torch.zeros(rows, length, dtype=torch.bool, device=device))  # fmt: skip

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> TeacherBatch:
        """On ``device``, the log-probs in ``dtype`` (default: theirs; converting on the device rounds as a cache
        of that dtype would)."""
        dtype = dtype or self.topk_logprobs.dtype
        return TeacherBatch(self.topk_ids.to(device, non_blocking=non_blocking),
                            self.topk_logprobs.to(device, dtype, non_blocking=non_blocking),
                            self.sampled_logprobs.to(device, dtype, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))  # fmt: skip

    def put(self, rows: list[int], scores: TeacherBatch) -> None:
        """Write ``scores`` (one row each, as many positions) into ``rows``, in this batch's dtype and place."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for mine, theirs in zip(
            (self.topk_ids, self.topk_logprobs, self.sampled_logprobs, self.mask),
            (scores.topk_ids, scores.topk_logprobs, scores.sampled_logprobs, scores.mask),
        ):
            mine.index_copy_(0, index, theirs.to(mine.device, mine.dtype))  # fmt: skip

    def entries(self) -> Iterator[TeacherScores]:
        """Each row's scores over its own positions (views; on the host for a host batch)."""
        for row in range(self.mask.shape[0]):
            valid = self.mask[row]
            yield TeacherScores(self.topk_ids[row][valid], self.topk_logprobs[row][valid],
                                self.sampled_logprobs[row][valid])  # fmt: skip


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


_VERIFIED: set[tuple[str, int, int, str]] = set()  # shards whose sha256 this process has checked
_VERIFIED_LOCK = threading.Lock()


def _verify(path: Path, shard: _Shard) -> None:
    """Check the shard's size and whole-file sha256 against its manifest; the sha256 once per process."""
    stat = os.stat(path)
    _check_size(path, stat.st_size, shard)
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


class _ShardData:
    """A shard's tensors, memory-mapped, with its offsets as a list and numpy views for :func:`_bits` copies."""

    _TENSORS = ("topk_ids", "topk_logprobs", "sampled_logprobs", "response_ids", "offsets")
    __slots__ = (*_TENSORS, "arrays")


class TeacherCache:
    """Reads a cache directory: the union of its ``manifest-*.json``, shards memory-mapped on first use.

    ``verify`` (default on) checks each shard's header hash when the cache is opened and the whole shard's
    sha256 before its first scores are returned, once per shard per process. Sizes are always checked.
    ``teacher`` is the fingerprint of the teacher that scored it (``teacher.json``); every manifest that lists
    shards must name it.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, verify: bool = True) -> None:
        self.cache_dir, self.verify = Path(cache_dir), verify
        self._data: dict[int, _ShardData] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the manifests, picking up shards that writers have added since."""
        if not self.cache_dir.is_dir():
            raise TeacherCacheError(f"teacher cache {self.cache_dir} does not exist")
        k, dtype, shards, teacher = _read_manifests(self.cache_dir)
        if k is None:
            raise TeacherCacheError(f"{self.cache_dir} is not a teacher cache: it has no manifest-*.json "
                                    "(a TeacherCacheWriter writes one when it flushes or closes)")  # fmt: skip
        index = _Index()
        _read_index(self.cache_dir, shards, index, self.verify)
        old = {s: self._data[i] for i, s in enumerate(getattr(self, "_shards", [])) if i in self._data}
        self.k, self.dtype, self._shards, self._index = k, _dtype(dtype), shards, index
        self.teacher = teacher  # the fingerprint teacher.json records (None: a cache from before it)
        self._data = {i: old[s] for i, s in enumerate(shards) if s in old}

    def __len__(self) -> int:
        return self._index.count

    def __contains__(self, key: str) -> bool:
        return self._index.holds_key(key)

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
            if offsets[0] != 0 or offsets[-1] != n or any(a > b for a, b in itertools.pairwise(offsets)):
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
        return self._batch(found, length)

    def lookup_batch(
        self, keys: Sequence[tuple[str, TokenIds, TokenIds]], length: int
    ) -> tuple[TeacherBatch, list[bool]]:
        """The cached scores of the responses ``keys`` (example id, prompt ids, response ids) as one host batch of
        ``length`` positions, and which of them the cache holds (the others are padding)."""
        found = [self._locate(*key) for key in keys]
        return self._batch(found, length), [f is not None for f in found]

    def _batch(self, found: list[tuple[Any, int, int] | None], length: int | None) -> TeacherBatch:
        """A host batch of the located entries (``_locate``'s results); None rows stay padding."""
        lengths = [hit[2] - hit[1] if hit is not None else 0 for hit in found]
        batch = _padded(len(found), _pad_length(lengths, length), self.k, self.dtype, lengths)
        out = _bits(batch.topk_ids, batch.topk_logprobs, batch.sampled_logprobs)
        for row, hit in enumerate(found):  # numpy copies: a few microseconds per response
            if hit is not None:
                data, start, end = hit
                for dst, src in zip(out, data.arrays):
                    dst[row, : end - start] = src[start:end]
        return batch
