"""A teacher process apart from training: score rollout files into the teacher-logit cache.

``tools/score_teacher.py`` drives this. It reads the student's fit config for the data (sources, pixel
bounds, prompting) and the cache settings (``model.init_args.teacher``), so that it rebuilds exactly the
student's prompts; a prompt whose token ids differ from the recorded ones stops it with a message. The
scorer records its teacher's fingerprint in the cache as an in-process teacher does (``HFTeacher.fingerprint``),
and is refused a cache that holds the scores of another teacher, before it writes anything there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from vlm_post.data import VLMDataModule
from vlm_post.data.datamodule import ExampleDataset
from vlm_post.errors import ConfigError
from vlm_post.rollout.batch import RolloutBatch
from vlm_post.teacher.cache_format import _DTYPE_NAMES, check_cache_teacher
from vlm_post.teacher.cache_writer import TeacherCacheWriter
from vlm_post.teacher.rollout_files import mark_done, pending_rollout_files, read_rollout_file
from vlm_post.teacher.scoring import HFTeacher


def load_fit_config(path: str | Path) -> tuple[VLMDataModule, dict, str]:
    """(data module, teacher settings, student model path) from a ``vlm_post fit`` config of a DistillModule."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(Path(path).read_text())
    try:
        init_args = config["model"]["init_args"]
        teacher, student = dict(init_args.get("teacher") or {}), init_args["model_name_or_path"]
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(VLMDataModule, "data")
        data = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a DistillModule fit config (missing {err})") from None
    except Exception as err:  # jsonargparse reports a bad data section
        raise ConfigError(f"{path}: data section: {err}") from None
    if not teacher.get("cache_dir"):
        raise ConfigError(f"{path}: model.init_args.teacher.cache_dir is not set: there is no cache to fill")
    return data, teacher, student


# How to go on when the cache holds another teacher's scores: a cache-only student reads one folder, the config's.
_HOW = (
    "score with the teacher that scored it, or give this teacher a cache of its own: set "
    "model.init_args.teacher.cache_dir to a new folder in the student's config, for the student and this scorer"
)


class RolloutScorer:
    """Scores rollout files of one training source with an HF teacher and appends them to the cache."""

    def __init__(self, data: VLMDataModule, teacher: HFTeacher, writer: TeacherCacheWriter, batch_rows: int = 8):
        if data.train_source is None:
            raise ConfigError("the config has no data.train: rollouts come from the training source")
        fingerprint = teacher.fingerprint(_DTYPE_NAMES[writer.dtype])
        check_cache_teacher(writer.cache_dir, fingerprint, _HOW)
        writer.bind_teacher(fingerprint)
        data.processor = teacher.processor
        self.dataset: ExampleDataset = data._dataset(data.train_source)
        self.by_id = {self.dataset[i].id: i for i in range(len(self.dataset))}
        self.collate = data.collator(with_prompt=True, with_sft=False)
        self.teacher, self.writer, self.batch_rows = teacher, writer, batch_rows

    def score_file(self, path: Path) -> int:
        """Score every record of one file; returns how many were new to the cache."""
        records = read_rollout_file(path)
        added = 0
        for start in range(0, len(records), self.batch_rows):
            added += self._score(records[start : start + self.batch_rows], path)
        self.writer.flush()
        mark_done(path)
        return added

    def _score(self, records: list[dict], path: Path) -> int:
        missing = [r["example_id"] for r in records if r["example_id"] not in self.by_id]
        if missing:
            raise ConfigError(f"rollout file {path}: example id {missing[0]!r} is not in data source "
                              f"{self.dataset.source.name!r}; score with the student's data config")  # fmt: skip
        batch = self.collate([self.dataset[self.by_id[r["example_id"]]] for r in records])
        prompt, counts = batch["prompt"], batch["image_counts"]
        for row, record in enumerate(records):
            ids = prompt["input_ids"][row][prompt["attention_mask"][row].bool()].tolist()
            if ids != record["prompt_ids"]:
                raise ConfigError(
                    f"rollout file {path}: example {record['example_id']!r}: this config's prompt has other token ids "
                    f"({len(ids)}) than the student's ({len(record['prompt_ids'])}); check the instruction, the pixel "
                    "bounds and the processor"
                )
        width = max(len(r["response_ids"]) for r in records)
        response = torch.zeros(len(records), width, dtype=torch.long)
        mask = torch.zeros(len(records), width, dtype=torch.long)
        for row, record in enumerate(records):
            response[row, : len(record["response_ids"])] = torch.tensor(record["response_ids"])
            mask[row, : len(record["response_ids"])] = 1
        device = next(self.teacher.model.parameters()).device
        prompt = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt.items()}
        mask = mask.to(device)
        samples = RolloutBatch(prompt, counts, 1, response.to(device), mask, mask.new_ones(len(records)).bool(), [])
        keys = [(record["example_id"], record["prompt_ids"], record["response_ids"]) for record in records]
        return self.writer.add_batch(keys, self.teacher.score(samples.rows()))

    def run(self, cache_dir: str, follow: bool, poll_s: float = 2.0, log: Callable[[str], None] = print) -> int:
        """Score pending files; with ``follow``, keep watching for new ones until interrupted."""
        total = 0
        while True:
            files = pending_rollout_files(cache_dir)
            for path in files:
                started = time.perf_counter()
                added = self.score_file(path)
                total += added
                log(f"scored {path.name}: {added} new responses in {time.perf_counter() - started:.1f} s")
            if not follow:
                return total
            if not files:
                time.sleep(poll_s)
