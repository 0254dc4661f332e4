"""PolicyModule: what every stage shares.

It owns the policy and its processor, weights-only init (``init_from``), the
optimizer and schedule, and evaluation. SFTModule, DistillModule and RLModule
only add a ``training_step`` and what it needs.

Evaluation is one code path: validation inside fit and ``vlm_post test`` both
sample responses through the rollout engine, grade them, and report per data
set (``val/<name>/accuracy``, ``test/<name>/accuracy``, ...). ``test`` also
writes per-problem JSONL and a ``summary.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.metrics import EvalMetrics
from vlm_post.models.init_from import (
    check_init_from,
    check_same_architecture,
    is_checkpoint,
    load_policy_state,
    policy_state_from_checkpoint,
)
from vlm_post.models.loading import (
    Dtype,
    check_image_text_to_text,
    freeze_vision,
    load_policy,
    load_processor,
    resolve_model_path,
)
from vlm_post.rewards import grade
from vlm_post.rollout import HFGenerateEngine, SamplingParams


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a cosine decay to ``min_lr_ratio * lr`` or a constant rate."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    """How evaluation samples. ``temperature: 0`` is greedy; ``n`` responses per problem otherwise.

    ``output_dir`` receives per-problem JSONL and ``summary.json`` after ``vlm_post test``
    (default ``<log_dir>/eval``).
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    output_dir: str | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.n, self.temperature, self.top_p, self.top_k, self.max_new_tokens)


# Checkpoints keep the hyperparameters, these dataclasses included; let `--ckpt_path` resume
# load them under torch.load(weights_only=True).
torch.serialization.add_safe_globals([OptimConfig, EvalConfig])


def lr_lambda(config: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class PolicyModule(LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        init_from: str | None = None,
        dtype: Dtype = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        freeze_vision_tower: bool = False,
        freeze_projector: bool = False,
        optim: OptimConfig | None = None,
        eval: EvalConfig | None = None,
        logprob_chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            model_name_or_path: HF hub id or local folder of an image-text-to-text model (architecture + processor).
            init_from: weights only, from an HF folder or a vlm_post ``.ckpt`` (fresh optimizer, step 0).
                Use ``--ckpt_path`` instead to resume a run.
            dtype: parameter dtype. Keep float32 with ``trainer.precision: bf16-mixed``, or bfloat16 for pure bf16.
            attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
            gradient_checkpointing: recompute decoder activations in the backward pass.
            freeze_vision_tower: do not train the vision encoder.
            freeze_projector: do not train the vision-to-text projector (Qwen's merger).
            optim: optimizer and learning-rate schedule.
            eval: sampling for validation and test.
            logprob_chunk_size: tokens per chunk when projecting hidden states onto the vocabulary.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_path = resolve_model_path(model_name_or_path)
        self.policy_config = check_image_text_to_text(self.model_path)
        self.init_from = check_init_from(init_from) if init_from else None
        if self.init_from and not is_checkpoint(self.init_from):
            check_same_architecture(self.policy_config, check_image_text_to_text(self.init_from), self.init_from)
        self.processor = load_processor(self.model_path)
        self.engine = HFGenerateEngine(self.processor)
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.freeze = (freeze_vision_tower, freeze_projector)
        self.optim = optim or OptimConfig()
        self.eval_config = eval or EvalConfig()
        self.logprob_chunk_size = logprob_chunk_size
        self.policy: torch.nn.Module | None = None
        self.eval_metrics = torch.nn.ModuleDict()
        self.eval_records: dict[str, list[dict]] = {}

    # --- model -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the policy (once). Runs after data setup, so bad data fails before any weights load."""
        if self.policy is not None:
            return
        from_hf_folder = self.init_from is not None and not is_checkpoint(self.init_from)
        self.policy = load_policy(self.init_from if from_hf_folder else self.model_path, self.dtype_name, self.attn_implementation)
        if self.init_from and is_checkpoint(self.init_from):
            load_policy_state(self.policy, policy_state_from_checkpoint(self.init_from), self.init_from)
        if self.init_from:
            rank_zero_info(f"policy weights initialised from {self.init_from}")
        freeze_vision(self.policy, *self.freeze)
        if self.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.policy, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
                self.policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.policy.config.use_cache = False

    def batch_parts(self, split: str) -> set[str]:
        """Which collated parts this module needs per split: ``prompt`` (for sampling) and/or ``sft``."""
        return {"prompt"}

    def hidden_states(self, inputs: dict) -> torch.Tensor:
        """The decoder's last hidden states; the vocabulary projection is left to the chunked losses."""
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        return self.policy.model(**inputs, use_cache=False).last_hidden_state

    @property
    def head_weight(self) -> torch.Tensor:
        return self.policy.get_output_embeddings().weight

    # --- optimisation --------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": self.optim.weight_decay},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.optim, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- evaluation ----------------------------------------------------------------------------------

    def _metrics(self, stage: str, name: str) -> EvalMetrics:
        key = f"{stage}__{name}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = EvalMetrics().to(self.device)
        return self.eval_metrics[key]

    def evaluate_batch(self, batch: dict, stage: str) -> str:
        """Sample, grade and update the data set's metrics; returns the data set's name."""
        examples = batch["examples"]
        name = examples[0].source
        rollouts = self.engine.generate(self.policy, batch["prompt"], self.eval_config.sampling())
        graded = [grade(text, examples[int(i)]) for text, i in zip(rollouts.texts, rollouts.prompt_index)]
        correct = [ok for ok, _ in graded]
        self._metrics(stage, name).update_from(correct, [answer is not None for _, answer in graded], rollouts.lengths)
        if stage == "test":
            n = self.eval_config.n
            records = self.eval_records.setdefault(name, [])
            for j, example in enumerate(examples):
                rows = range(j * n, (j + 1) * n)
                records.append(
                    {
                        "id": example.id,
                        "answer": example.answer,
                        "responses": [rollouts.texts[r] for r in rows],
                        "extracted": [graded[r][1] for r in rows],
                        "correct": [graded[r][0] for r in rows],
                    }
                )
        return name

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        rollouts = self.engine.generate(self.policy, batch["prompt"], self.eval_config.sampling())
        examples = batch["examples"]
        rows = [
            {"id": examples[int(i)].id, "dataset": examples[int(i)].source, "response": text}
            for text, i in zip(rollouts.texts, rollouts.prompt_index)
        ]
        self.eval_records.setdefault("predictions", []).extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            out = self._output_dir()
            with open(out / "predictions.jsonl", "w") as handle:
                for row in self.eval_records.pop("predictions", []):
                    handle.write(json.dumps(row) + "\n")
            rank_zero_info(f"predictions written to {out / 'predictions.jsonl'}")

    def _output_dir(self) -> Path:
        out = Path(self.eval_config.output_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "eval")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _log_eval(self, stage: str) -> dict[str, dict[str, float]]:
        summary = {}
        for key, metrics in self.eval_metrics.items():
            metric_stage, name = key.split("__", 1)
            if metric_stage != stage:
                continue
            values = {k: float(v) for k, v in metrics.compute().items()}
            metrics.reset()
            summary[name] = values
            for metric, value in values.items():
                self.log(f"{stage}/{name}/{metric}", value)  # already synced by compute()
        return summary

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        summary = self._log_eval("test")
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        out = self._output_dir()
        for name, records in self.eval_records.items():
            with open(out / f"{name}.jsonl", "w") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        rows = [
            {"dataset": name, "problems": len(self.eval_records.get(name, [])), **values}
            for name, values in summary.items()
        ]
        meta = {"model": self.init_from or self.model_path, "global_step": self.global_step, "eval": asdict(self.eval_config)}
        (out / "summary.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
        self.eval_records = {}
        print(format_table(rows))
        rank_zero_info(f"evaluation written to {out}")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)"
    columns = list(rows[0])
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])
