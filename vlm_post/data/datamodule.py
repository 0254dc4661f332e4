"""The one LightningDataModule for every stage: Geometry3K, MathVista and the synthetic demo task.

Training reads one source; validation and test read several, each reported
under its own name (in-domain Geometry3K validation and out-of-domain MathVista
side by side). Rows are checked once at setup: a bad row (an unreadable JSON
line, a missing or corrupt image, an empty question or answer, a prompt over
``max_prompt_length``) is reported with its id (or its file and line), skipped
and counted, so a run never dies on row 1,734 at hour three. With
``fail_fast`` the first bad row stops setup instead.

The processor comes from the LightningModule (it owns the policy), so model and
data can never disagree on the tokenizer or the chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from vlm_post.data.collate import Collator
from vlm_post.data.limits import PromptLimit
from vlm_post.data.prompting import DEFAULT_ANSWER_TEMPLATE, DEFAULT_INSTRUCTION
from vlm_post.data.sampler import EvalShardSampler, ResumableRandomSampler
from vlm_post.data.schema import Example
from vlm_post.data.sources import ADAPTERS, BadRow, DataSource, _first_line, _is_local, fit_pixels, load_rows
from vlm_post.errors import ConfigError
from vlm_post.ranges import NonNegativeInt, PositiveInt

_REPORTED_PER_SOURCE = 20


class ExampleDataset(Dataset):
    """Rows of one source, normalised lazily to Examples; ``indices`` lists the rows that passed the check.

    ``skipped`` lists ``(culprit, reason)`` per bad row, the culprit being ``id=<id>`` or, for a record that could
    not be read as a row, ``<file> line <n>``.
    """

    def __init__(
        self,
        source: DataSource,
        min_pixels: int,
        max_pixels: int,
        fail_fast: bool = False,
        prompt_limit: PromptLimit | None = None,
    ) -> None:
        self.source = source
        loaded = load_rows(source)
        self.rows = loaded.rows
        self.adapter = ADAPTERS[source.kind]
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        path = Path(source.path).expanduser() if source.path and _is_local(source.path) else None
        self.base_dir = (path if path.is_dir() else path.parent) if path else None
        self.fail_fast = fail_fast
        self.skipped: list[tuple[str, str]] = []
        for where, reason in loaded.unreadable:
            self._skip(where, reason)
        self.indices = [index for index in range(len(self.rows)) if self._usable(index, prompt_limit)]
        total = len(self.rows) + len(loaded.unreadable)
        if self.skipped:
            rank_zero_warn(f"data source {source.name!r}: skipped {len(self.skipped)} of {total} rows")
        if not self.indices:
            first = f" (first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise ConfigError(f"data source {source.name!r}: no usable rows in {source.path or source.kind!r}{first}")

    def _usable(self, index: int, prompt_limit: PromptLimit | None) -> bool:
        """Whether row ``index`` becomes an Example within the prompt limit; a bad one is reported and counted."""
        try:
            example = self._example(index)
            if prompt_limit is not None:
                prompt_limit.check(example)
        except BadRow as reason:
            self._skip(self._culprit(index), str(reason))
            return False
        return True

    def _skip(self, culprit: str, reason: str) -> None:
        if self.fail_fast:
            raise ConfigError(f"data source {self.source.name!r}: bad row {culprit}: {reason}")
        self.skipped.append((culprit, reason))
        if len(self.skipped) <= _REPORTED_PER_SOURCE:
            rank_zero_warn(f"data source {self.source.name!r}: skipped row {culprit}: {reason}")

    def _row(self, index: int) -> dict:
        try:
            return self.rows[index]
        except Exception as error:  # arrow decodes a row only when it is read: invalid UTF-8 in a string column, ...
            raise BadRow(f"unreadable row ({_first_line(error)})") from None

    def _culprit(self, index: int) -> str:
        try:
            row = self.rows[index]
        except Exception:  # the row cannot be read, so neither can its id
            return f"at index {index} of {self.source.path}"
        return f"id={row.get('id', row.get('pid', index))}"

    def _example(self, index: int) -> Example:
        example = self.adapter(self._row(index), index, self.source.name, self.base_dir)
        example.images = [fit_pixels(image, self.min_pixels, self.max_pixels) for image in example.images]
        return example

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Example]:  # the examples once (indexing past the end gives fillers)
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Example:
        if len(self) <= i < 2 * len(self):  # an EvalShardSampler filler: a copy of problem i - len, counted nowhere
            example = self._example(self.indices[i - len(self)])
            example.is_padding = True
            return example
        return self._example(self.indices[i])


class VLMDataModule(LightningDataModule):
    def __init__(
        self,
        train: DataSource | None = None,
        val: list[DataSource] | None = None,
        test: list[DataSource] | None = None,
        batch_size: PositiveInt = 8,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
        instruction: str = DEFAULT_INSTRUCTION,
        target_column: str | None = None,
        answer_template: str = DEFAULT_ANSWER_TEMPLATE,
        max_target_tokens: PositiveInt | None = None,
        max_prompt_length: PositiveInt | None = 8192,
        min_pixels: PositiveInt = 3136,
        max_pixels: PositiveInt = 1_003_520,
        fail_fast: bool = False,
        seed: NonNegativeInt = 0,
    ) -> None:
        """
        Args:
            train: the training source.
            val: validation sources, each reported under its own name.
            test: test sources for ``vlm_post test``.
            batch_size: prompts per training micro-batch (per device).
            eval_batch_size: prompts per validation/test batch (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            instruction: appended to every question; asks for ``<think>`` reasoning and a ``\\boxed{}`` answer.
            target_column: SFT target column (e.g. teacher solutions); ``None`` uses ``answer_template``.
            answer_template: SFT target when no column is given; ``{answer}`` is replaced by the answer.
            max_target_tokens: truncate SFT targets to this many tokens.
            max_prompt_length: the longest prompt, in tokens: the chat-templated text with the instruction plus
                the image tokens (``vlm_post.data.limits`` says what is counted). A longer row is reported (id,
                length, limit), skipped and counted at setup, as EasyR1's ``filter_overlong_prompts`` does; so is
                a question longer than 16 characters per token of this, before it is ever tokenized. The default,
                8192, passes any one-image prompt that ``max_pixels`` up to 4,194,304 allows (about 5,350 image
                tokens for Qwen2.5-VL, plus the text), so on the shipped configs it catches broken rows without
                thinning a benchmark; EasyR1's Geometry3K recipe uses 2048. ``null`` turns both checks off.
            min_pixels: images smaller than this (width*height) are scaled up, keeping the aspect ratio.
            max_pixels: images larger than this are scaled down, keeping the aspect ratio.
            fail_fast: stop at the first bad row instead of reporting, counting and skipping it.
            seed: seed of the training order (epoch e is shuffled with seed + e).
        """
        super().__init__()
        self.train_source = train
        self.val_sources = list(val or [])
        self.test_sources = list(test or [])
        names = [s.name for s in self.val_sources] + [s.name for s in self.test_sources]
        for source in ([train] if train else []) + self.val_sources + self.test_sources:
            source.check()
        val_names, test_names = [s.name for s in self.val_sources], [s.name for s in self.test_sources]
        if len(set(val_names)) != len(val_names) or len(set(test_names)) != len(test_names):
            raise ConfigError(f"data source names must be unique within val and within test, got {names}")
        if min_pixels > max_pixels:
            raise ConfigError(f"data.min_pixels ({min_pixels}) is larger than data.max_pixels ({max_pixels})")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.instruction = instruction
        self.target_column = target_column
        self.answer_template = answer_template
        self.max_target_tokens = max_target_tokens
        self.max_prompt_length = max_prompt_length
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.fail_fast = fail_fast
        self.seed = seed
        self._resume: dict | None = None
        self.processor = None  # set by setup() from the LightningModule, or by hand outside a Trainer
        self.datasets: dict[str, ExampleDataset] = {}

    @property
    def val_names(self) -> list[str]:
        return [s.name for s in self.val_sources]

    @property
    def test_names(self) -> list[str]:
        return [s.name for s in self.test_sources]

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped per source name."""
        return {name: len(ds.skipped) for name, ds in self.datasets.items()}

    def _dataset(self, source: DataSource) -> ExampleDataset:
        if source.name not in self.datasets:
            self.datasets[source.name] = ExampleDataset(
                source, self.min_pixels, self.max_pixels, self.fail_fast, self._prompt_limit()
            )
            rank_zero_info(f"data source {source.name!r}: {len(self.datasets[source.name])} examples")
        return self.datasets[source.name]

    def _prompt_limit(self) -> PromptLimit | None:
        if self.max_prompt_length is None:
            return None
        return PromptLimit(self.max_prompt_length, self.instruction, self.processor)

    def setup(self, stage: str) -> None:
        if self.processor is None:
            self.processor = self.trainer.lightning_module.processor
        if stage == "fit":
            if self.train_source is None:
                raise ConfigError("`fit` needs data.train")
            self._dataset(self.train_source)
        if stage in ("fit", "validate"):
            for source in self.val_sources:
                self._dataset(source)
        if stage in ("test", "predict"):
            if not self.test_sources:
                raise ConfigError(f"`{stage}` needs data.test")
            for source in self.test_sources:
                self._dataset(source)

    def collator(self, with_prompt: bool, with_sft: bool) -> Collator:
        return Collator(
            self.processor,
            instruction=self.instruction,
            with_prompt=with_prompt,
            with_sft=with_sft,
            target_column=self.target_column,
            answer_template=self.answer_template,
            max_target_tokens=self.max_target_tokens,
        )

    def _parts(self, split: str) -> tuple[bool, bool]:
        """(prompt, sft) parts the LightningModule wants for this split; SFT-only training by default."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        parts = module.batch_parts(split) if module is not None else ({"sft"} if split == "train" else {"prompt"})
        return "prompt" in parts, "sft" in parts

    def _loader(
        self, dataset: Dataset, split: str, batch_size: int, sampler=None, drop_last: bool = False
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collator(*self._parts(split)),
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset(self.train_source)
        ranks = self._data_parallel_ranks()
        self.train_sampler = ResumableRandomSampler(len(dataset), seed=self.seed, **ranks)
        if self._resume is not None:  # batches per rank; every rank has taken as many
            start = self._resume["batches"] * self.batch_size * ranks["num_replicas"]
            self.train_sampler.resume_at(self._resume["epoch"], start)
        return self._loader(dataset, "train", self.batch_size, self.train_sampler, drop_last=True)

    def _data_parallel_ranks(self) -> dict[str, int]:
        """This process's place among the data-parallel ranks (DDP, FSDP, ModelParallelStrategy's data axis)."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return {"num_replicas": int(kwargs.get("num_replicas", 1)), "rank": int(kwargs.get("rank", 0))}

    # The training position, saved in every checkpoint, so that `--ckpt_path` resumes mid-epoch exactly.
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(source, "val") for source in self.val_sources]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(source, "test") for source in self.test_sources]

    def _eval_loader(self, source: DataSource, split: str) -> DataLoader:
        dataset = self._dataset(source)
        ranks = self._data_parallel_ranks()
        sampler = EvalShardSampler(len(dataset), **ranks) if ranks["num_replicas"] > 1 else None
        return self._loader(dataset, split, self.eval_batch_size, sampler)

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
