"""Where an OPD step's teacher scores come from: the teacher-logit cache first, then the in-process teacher
(whose scores are appended to the cache), or, with no in-process teacher, an external scorer
(``tools/score_teacher.py``) that is handed the missing rows as a rollout file and waited for.

The cache records the fingerprint of the teacher and settings that scored it: a cache of another teacher is
refused, or with ``on_mismatch: rescore`` scored anew into a namespace of this teacher's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.errors import ConfigError
from vlm_post.teacher.cache import TeacherBatch, TeacherCache
from vlm_post.teacher.cache_format import check_cache_teacher, namespace_dir, rescore_dir
from vlm_post.teacher.cache_writer import TeacherCacheWriter
from vlm_post.teacher.fingerprint import TeacherFingerprint
from vlm_post.teacher.rollout_files import write_rollout_file
from vlm_post.teacher.scoring import HFTeacher

if TYPE_CHECKING:
    from vlm_post.modules.distill import TeacherConfig
    from vlm_post.rollout import RolloutBatch

# A row's cache key: its example id, its prompt's token ids (padding removed) and its response's.
RowKey = tuple[str, torch.Tensor, torch.Tensor]


def row_keys(samples: RolloutBatch, examples) -> list[RowKey]:
    """Each row's cache key."""
    prompt, keys = samples.prompt, []
    for row, p in enumerate(samples.prompt_index.tolist()):
        prompt_ids = prompt["input_ids"][p][prompt["attention_mask"][p].bool()]
        response_ids = samples.response_ids[row][samples.response_mask[row].bool()]
        keys.append((examples[p].id, prompt_ids.cpu(), response_ids.cpu()))
    return keys


def has_manifest(cache_dir: str | Path) -> bool:
    return any(Path(cache_dir).glob("manifest*.json"))


class TeacherScoreSource:
    """The teacher scores of an OPD run (``config``: ``model.teacher``)."""

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.teacher: HFTeacher | None = None  # the in-process teacher, set by open()
        self.scored_rows = 0  # rows the in-process teacher scored (not found in the cache)
        self.fingerprint: TeacherFingerprint | None = None  # the in-process teacher's, set by open()
        self._cache: TeacherCache | None = None
        self._writer: TeacherCacheWriter | None = None
        self._cache_dir = Path(config.cache_dir) if config.cache_dir else None  # the namespace, once rescoring

    def open(self, teacher: HFTeacher | None, writer_id: str) -> None:
        """Score with ``teacher`` (loaded; None: cache-only), and check and open the cache: before any step, so a
        cache of another teacher is refused before anything in it changes."""
        self.teacher = teacher
        if not self.config.cache_dir:
            return
        self._cache_dir = self._scores_dir()
        if self.teacher is not None:
            self._writer = TeacherCacheWriter(
                self._cache_dir,
                k=self.config.top_k,
                dtype=self.config.cache_dtype,
                writer_id=writer_id,
                teacher=self.fingerprint,
            )
        self._cache = self._open_cache()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _scores_dir(self) -> Path:
        """Where this run's scores are: ``cache_dir``, or, rescoring, this teacher's namespace in a cache of
        another. A cache of another teacher is refused (``on_mismatch: error``) before anything in it changes."""
        root = Path(self.config.cache_dir)
        if self.teacher is None:
            return root  # cache-only: which teacher scored is the external scorer's to check
        fingerprint = self.fingerprint = self.teacher.fingerprint(self.config.cache_dtype)
        if self.config.on_mismatch == "rescore":
            scores_dir = rescore_dir(root, fingerprint)
            if scores_dir != root:
                rank_zero_info(f"teacher cache {root} holds other scores than teacher {fingerprint.describe()}'s: "
                               f"scoring anew into {scores_dir}")  # fmt: skip
            return scores_dir
        how = (
            f"set model.teacher.on_mismatch: rescore to score anew into {namespace_dir(root, fingerprint)} (the "
            "scores already there stay as they are), point model.teacher.cache_dir at another folder, or use the "
            "teacher that scored it"
        )
        check_cache_teacher(root, fingerprint, how)
        return root

    def _open_cache(self) -> TeacherCache | None:
        """The cache's reader once it has a manifest; one of another top-k or dtype than the config's is refused."""
        if not has_manifest(self._cache_dir):
            return None
        cache = TeacherCache(self._cache_dir)
        top_k, dtype = self.config.top_k, self.config.cache_dtype
        if (cache.k, cache.dtype) != (top_k, getattr(torch, dtype)):
            cached = str(cache.dtype).removeprefix("torch.")
            raise ConfigError(
                f"teacher cache {self._cache_dir} holds top_k={cache.k} {cached} scores, model.teacher asks for "
                f"top_k={top_k} {dtype}: set model.teacher.top_k and cache_dtype to the cache's, or use another "
                "cache_dir"
            )
        return cache

    def scores(
        self,
        samples: RolloutBatch,
        examples: list,
        micro_batch_size: int,
        name: str,
        passes_to_run: Callable[[int], int] | None = None,
    ) -> TeacherBatch:
        """Scores of every row of ``samples`` (answering ``examples``), as one batch on the samples' device: from
        the cache where it has them, else from the in-process teacher in passes of ``micro_batch_size`` rows, or,
        cache-only, from an external scorer given the missing rows in rollout file ``name``.
        ``passes_to_run(count)``: the passes this process runs when its teacher's forwards are collectives (the
        most over the ranks; default ``count``).

        Without a cache the in-process teacher's fp32 scores stay as they are, on the device. With one, they are
        rounded to the cache's dtype on the device, so that a run that reads them back from the cache trains on
        the very same numbers; only the cache writer moves them to the host.
        """
        mask = samples.response_mask
        rows, length = mask.shape
        uses_cache = self.config.cache_dir is not None
        keys = row_keys(samples, examples) if uses_cache else None  # copies every row's ids to the host
        missing = list(range(rows))
        batch = None
        if self._cache is not None:
            if self.teacher is None:  # an external scorer appends shards while we train
                self._cache.reload()
            cached, found = self._cache.lookup_batch(keys, length)
            if any(found):  # else nothing to copy to the device: the teacher fills a batch made there
                batch = cached.to(mask.device)
            missing = [row for row in missing if not found[row]]
        if missing and self.teacher is None:
            records = [
                {"example_id": keys[row][0], "prompt_ids": keys[row][1].tolist(), "response_ids": keys[row][2].tolist()}
                for row in missing
            ]
            write_rollout_file(self.config.cache_dir, name, records)
            self._wait_for_cache(keys, missing)
            return self._cache.lookup_batch(keys, length)[0].to(mask.device)
        dtype = getattr(torch, self.config.cache_dtype) if uses_cache else torch.float32
        if batch is None:
            batch = TeacherBatch.zeros(rows, length, self.config.top_k, dtype, mask.device)
        passes = [missing[start : start + micro_batch_size] for start in range(0, len(missing), micro_batch_size)]
        for index in range(passes_to_run(len(passes)) if passes_to_run else len(passes)):
            if index >= len(passes):  # a sharded teacher's forwards are collectives: join the ranks still scoring
                self.teacher.score(samples.rows([0]))
                continue
            scored = self.teacher.score(samples.rows(passes[index])).to(mask.device, dtype)
            batch.put(passes[index], scored)
            if self._writer is not None:
                self._writer.add_batch([keys[row] for row in passes[index]], scored)
        self.scored_rows += len(missing)
        if self._writer is not None and missing:
            # Each round's scores are on disk before its update, so a resumed run finds them. This run does not
            # read them back: its later samples differ, and re-reading the growing index every step costs.
            self._writer.flush()
        return batch

    def _wait_for_cache(self, keys: list[RowKey], missing: list[int]) -> None:
        """Until the cache holds rows ``missing`` (an external scorer adds them), or ``wait_s`` has passed."""
        deadline = time.monotonic() + self.config.wait_s
        while True:
            if not missing:
                return
            if time.monotonic() >= deadline:
                example_id = keys[missing[0]][0]
                raise ConfigError(
                    f"teacher cache {self.config.cache_dir}: no scores for {len(missing)} of {len(keys)} "
                    f"responses (first: example {example_id!r}) after waiting {self.config.wait_s:.0f} s; "
                    "set model.teacher.model_name_or_path to score in-process, or run tools/score_teacher.py "
                    f"on {self.config.cache_dir}/rollouts (and raise model.teacher.wait_s)"
                )
            time.sleep(1.0)
            if self._cache is None:
                self._cache = self._open_cache()
            if self._cache is not None:
                self._cache.reload()
                missing = [row for row in missing if self._cache.get(*keys[row]) is None]
