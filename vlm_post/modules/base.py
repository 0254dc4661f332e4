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
import os
import tempfile
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from vlm_post.checkpoint_io import read_fsdp_full_checkpoints_with_mmap
from vlm_post.metrics import EvalMetrics
from vlm_post.models.forward import decoder_hidden_states
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
from vlm_post.models.sharding import FSDPConfig, data_parallel_mesh, shard_model
from vlm_post.modules.evaluation import EvalConfig, confidence_intervals, evaluate_batch, format_table
from vlm_post.modules.nonfinite import NonFiniteGuard, SkippedSteps
from vlm_post.modules.rng import restore_rng_states, rng_states
from vlm_post.ranges import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ProperFraction,
    check_ranges,
    plain_values,
)
from vlm_post.rewards import grading_stats
from vlm_post.rollout import HFGenerateEngine, RolloutEngine
from vlm_post.rollout.vllm import VLLMConfig, VLLMEngine, require_vllm
from vlm_post.rollout.vllm_server import VLLMServerEngine


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a cosine decay to ``min_lr_ratio * lr`` or a constant rate."""

    lr: NonNegativeFloat = 1e-5
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[ProperFraction, ProperFraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: ClosedUnitInterval = 0.0

    def __post_init__(self) -> None:
        check_ranges(self)


# Checkpoints keep the hyperparameters, these dataclasses included; let `--ckpt_path` resume
# load them under torch.load(weights_only=True).
torch.serialization.add_safe_globals([OptimConfig, EvalConfig, FSDPConfig, VLLMConfig])


def lr_lambda(config: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class PolicyModule(NonFiniteGuard, LightningModule):
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
        val: EvalConfig | None = None,
        logprob_chunk_size: PositiveInt = 1024,
        fsdp: FSDPConfig | None = None,
        max_consecutive_skips: PositiveInt = 3,
        vllm: VLLMConfig | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: HF hub id or local folder of an image-text-to-text model (architecture + processor).
            init_from: weights only, from an HF folder or a vlm_post ``.ckpt`` (a file, or the folder of a sharded
                checkpoint) (fresh optimizer, step 0).
                Use ``--ckpt_path`` instead to resume a run.
            dtype: parameter dtype. Keep float32 with ``trainer.precision: bf16-mixed``, or bfloat16 for pure bf16.
            attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
            gradient_checkpointing: recompute decoder activations in the backward pass.
            freeze_vision_tower: do not train the vision encoder.
            freeze_projector: do not train the vision-to-text projector (Qwen's merger).
            optim: optimizer and learning-rate schedule.
            eval: sampling and metrics for ``vlm_post test`` (n samples, greedy, pass@k, entropy).
            val: the same for validation inside fit (default: ``eval``); keep it cheap, it runs every
                ``trainer.val_check_interval`` steps.
            logprob_chunk_size: tokens per chunk when projecting hidden states onto the vocabulary.
            fsdp: per-layer FSDP2 sharding, applied when ``trainer.strategy`` is Lightning's
                ModelParallelStrategy (ignored under any other strategy).
            max_consecutive_skips: optimizer steps with a NaN/inf loss or gradient are skipped (the weights
                stay as they were, the step counts); this many in a row stop the run (1: at the first).
            vllm: the vLLM engine's settings, for ``eval.engine``, ``val.engine`` and (RL, OPD) ``rollout.engine``
                ``vllm``: one engine serves them all.
        """
        super().__init__()
        self.eval_config = eval or EvalConfig()
        self.val_config = val or self.eval_config
        require_vllm(vllm, eval=self.eval_config.engine, val=self.val_config.engine)  # before any weights load
        # LightningCLI re-applies a checkpoint's hyperparameters over the config on `--ckpt_path`; the
        # evaluation protocol and the weights' origin belong to the command at hand, not to the checkpoint.
        self.save_hyperparameters(ignore=["init_from", "eval", "val", "reward", "vllm"])
        self.model_path = resolve_model_path(model_name_or_path)
        self.policy_config = check_image_text_to_text(self.model_path)
        self.init_from = check_init_from(init_from) if init_from else None
        if self.init_from and not is_checkpoint(self.init_from):
            check_same_architecture(self.policy_config, check_image_text_to_text(self.init_from), self.init_from)
        self.processor = load_processor(self.model_path)
        self.engine = HFGenerateEngine(self.processor)
        self.vllm_config = vllm or VLLMConfig()
        self._vllm_engine: VLLMEngine | VLLMServerEngine | None = None
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.freeze = (freeze_vision_tower, freeze_projector)
        self.optim = optim or OptimConfig()
        self.logprob_chunk_size = logprob_chunk_size
        self.fsdp = fsdp or FSDPConfig()
        self._fsdp_mesh = None
        self.policy: torch.nn.Module | None = None
        self.eval_metrics = torch.nn.ModuleDict()
        self.eval_records: dict[str, list[dict]] = {}
        self.skips = SkippedSteps(max_consecutive_skips)

    # --- model -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):  # before any checkpoint is restored
            read_fsdp_full_checkpoints_with_mmap()

    def configure_model(self) -> None:
        """Load the policy (once). Runs after data setup, so bad data fails before any weights load."""
        if self.policy is not None:
            return
        from_hf_folder = self.init_from is not None and not is_checkpoint(self.init_from)
        policy = load_policy(
            self.init_from if from_hf_folder else self.model_path, self.dtype_name, self.attn_implementation
        )
        if self.init_from and is_checkpoint(self.init_from):
            state = policy_state_from_checkpoint(self.init_from, template=policy.state_dict())
            load_policy_state(policy, state, self.init_from)
        if self.init_from:
            rank_zero_info(f"policy weights initialised from {self.init_from}")
        freeze_vision(policy, *self.freeze)
        # Decided on the whole tensors: FSDP1 flattens parameters (a matrix shard looks 1-D to ndim).
        self._no_decay = {f"policy.{name}" for name, p in policy.named_parameters() if p.ndim < 2}
        self.on_policy_loaded(policy)
        if self.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
                policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            policy.config.use_cache = False
        self.policy = self.shard(policy)

    def on_policy_loaded(self, policy: torch.nn.Module) -> None:
        """The initial policy, before it is sharded: where subclasses copy frozen models from it (RL's reference)."""

    @property
    def sharded(self) -> bool:
        """Whether models are FSDP2-sharded: the trainer's strategy is ModelParallelStrategy."""
        return self.device_mesh is not None

    def shard(self, model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
        """``model`` sharded per layer as ``fsdp`` says under ModelParallelStrategy; as it is otherwise."""
        if not self.sharded:
            return model
        if self._fsdp_mesh is None:
            self._fsdp_mesh = data_parallel_mesh(self.device_mesh, self.fsdp.replicas)
        return shard_model(model, self._fsdp_mesh, self.fsdp, frozen=frozen)

    # --- exact resume: the global RNG streams (sampling, dropout) continue where the checkpoint left them --

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._refuse_nonfinite_checkpoint(checkpoint)
        for key, value in checkpoint.items():  # hyperparameters, and the optimizer's lr taken from them
            checkpoint[key] = plain_values(value)
        checkpoint["vlm_post_rng"] = rng_states()
        checkpoint["vlm_post_skipped_steps"] = self.skips.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("vlm_post_rng")
        if "vlm_post_skipped_steps" in checkpoint:
            self.skips.load_state_dict(checkpoint["vlm_post_skipped_steps"])

    def on_train_start(self) -> None:
        # Applied here, not at load time: setup between loading and training may draw random numbers.
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states:
            restore_rng_states(states)

    def batch_parts(self, split: str) -> set[str]:
        """Which collated parts this module needs per split: ``prompt`` (for sampling) and/or ``sft``."""
        return {"prompt"}

    def hidden_states(self, inputs: dict, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The decoder's last hidden states (of the policy, or of ``model``, e.g. a frozen reference);
        the vocabulary projection is left to the chunked losses."""
        return decoder_hidden_states(model or self.policy, inputs)

    def token_share(self, tokens: torch.Tensor | float) -> torch.Tensor:
        """This rank's share of the tokens of the global (all data-parallel ranks') batch, times the rank count.

        Data-parallel strategies average gradients over ranks. A rank's token-mean loss scaled by this weighs
        each token alike across ranks, so the update is the one a single process takes with the global batch,
        however the tokens fall across ranks (verl's global token mean). 1 in a single process.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.float32, device=self.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return torch.ones((), device=self.device)
        total = self.trainer.strategy.reduce(tokens.clone(), reduce_op="sum")
        return tokens * world / total.clamp(min=1)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.policy.get_output_embeddings().weight

    # --- optimisation --------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [(_unwrapped_name(n), p) for n, p in self.named_parameters() if p.requires_grad]
        no_decay = getattr(self, "_no_decay", None) or {n for n, p in params if p.ndim < 2}
        groups = [
            {"params": [p for n, p in params if n not in no_decay], "weight_decay": self.optim.weight_decay},
            {"params": [p for n, p in params if n in no_decay], "weight_decay": 0.0},  # biases, norms
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.optim, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and isinstance(self.trainer.strategy, FSDPStrategy)
        ):
            # Lightning's FSDP1 precision plugin refuses norm clipping (a per-rank norm would be wrong); the root
            # FSDP module computes the global norm over all shards.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- evaluation ----------------------------------------------------------------------------------

    def rollout_engine(self, name: Literal["hf", "vllm"]) -> RolloutEngine:
        """The engine called ``name``: the HF engine, or the run's one vLLM engine (built on first use), which
        evaluation, validation and training rollouts share."""
        if name == "hf":
            return self.engine
        if self._vllm_engine is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))  # the run's seed_everything, as the HF engine's RNG
            if self.vllm_config.server_urls:  # server mode: the weights reach the servers through the run's folder
                root = Path(self.trainer.default_root_dir if self._trainer is not None else tempfile.mkdtemp())
                self._vllm_engine = VLLMServerEngine(
                    self.processor, self.model_path, self.vllm_config, root / "vllm_sync", seed
                )
            else:
                self._vllm_engine = VLLMEngine(self.processor, self.model_path, self.vllm_config, seed)
        return self._vllm_engine

    def _sync_evaluation_engine(self, config: EvalConfig) -> None:
        # vLLM holds its own copy of the weights: give it the policy's, which init_from or training changed.
        if config.engine == "vllm":
            self.rollout_engine(config.engine).sync(self.policy)

    def _close_vllm_engine(self) -> None:
        if self._vllm_engine is not None:
            self._vllm_engine.close()
            self._vllm_engine = None

    def on_validation_start(self) -> None:
        self._sync_evaluation_engine(self.val_config)

    def on_validation_end(self) -> None:
        if self._vllm_engine is not None:
            self._vllm_engine.sleep()  # with model.vllm.enable_sleep_mode: training has the GPU until the next sync

    def on_test_start(self) -> None:
        self._sync_evaluation_engine(self.eval_config)

    def on_predict_start(self) -> None:
        self._sync_evaluation_engine(self.eval_config)

    def on_test_end(self) -> None:
        self._close_vllm_engine()

    def on_predict_end(self) -> None:
        self._close_vllm_engine()

    def on_fit_end(self) -> None:
        self._close_vllm_engine()

    def _metrics(self, stage: str, name: str, config: EvalConfig) -> EvalMetrics:
        key = f"{stage}__{name}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = EvalMetrics(config.pass_k, greedy=config.greedy).to(self.device)
        return self.eval_metrics[key]

    def evaluate(self, batch: dict, stage: str) -> str:
        """Evaluate one batch of one data set and update its metrics; returns the data set's name."""
        config = self.val_config if stage == "val" else self.eval_config
        examples = batch["examples"]
        name = examples[0].source
        result = evaluate_batch(self, batch, config)  # fillers too: every rank runs the same forwards under FSDP
        real = [i for i, example in enumerate(examples) if not example.is_padding]
        if len(real) < len(examples):
            result, examples = result.select(real), [examples[i] for i in real]
        if not examples:
            return name
        self._metrics(stage, name, config).update_from(**result.metric_fields())
        if stage == "test":
            self.eval_records.setdefault(name, []).extend(result.records(examples))
        return name

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """One row per problem with its ``eval.n`` sampled responses (or the greedy one when n = 0)."""
        config = self.eval_config
        params = config.sampling() if config.n else config.greedy_sampling()
        examples, n = batch["examples"], params.n
        rollouts = self.rollout_engine(config.engine).sample(self.policy, batch, params)
        rows = [
            {"id": example.id, "dataset": example.source, "responses": rollouts.texts[i * n : (i + 1) * n]}
            for i, example in enumerate(examples)
            if not example.is_padding
        ]
        self.eval_records.setdefault("predictions", []).extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        rows = self._gather(self.eval_records.pop("predictions", []))
        if self.trainer.is_global_zero:
            out = self._output_dir()
            with open(out / "predictions.jsonl", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
            rank_zero_info(f"predictions written to {out / 'predictions.jsonl'}")

    def _output_dir(self) -> Path:
        out = Path(self.eval_config.output_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "eval")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _gather(self, rows: list) -> list:
        """All ranks' rows, on every rank, in the data set's order (a no-op in one process).

        Rank r evaluated problems r, r + R, r + 2R, ... (``EvalShardSampler``), so taking the ranks' rows in
        turn restores the order one process has, and with it the same files and bootstrap intervals.
        """
        if self.trainer.world_size == 1:
            return rows
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, rows)
        missing = object()
        return [row for turn in zip_longest(*gathered, fillvalue=missing) for row in turn if row is not missing]

    def _log_eval(self, stage: str) -> dict[str, dict[str, float]]:
        summary = {}
        for key, metrics in self.eval_metrics.items():
            metric_stage, name = key.split("__", 1)
            if metric_stage != stage:
                continue
            values = {k: float(v) for k, v in metrics.compute().items()}  # compute() syncs across ranks
            metrics.reset()
            summary[name] = values
            for metric, value in values.items():  # the same on every rank (compute() synced): the mean is the value
                self.log(f"{stage}/{name}/{metric}", value, sync_dist=True)
        timeouts = grading_stats().reset()["timeouts"]  # counted since the last evaluation
        self.log(f"{stage}/grading_timeouts", float(timeouts), reduce_fx="sum", sync_dist=True)
        return summary

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        summary = self._log_eval("test")
        records = {name: self._gather(self.eval_records.get(name, [])) for name in summary}
        self.eval_records = {}
        if not self.trainer.is_global_zero:
            return
        config = self.eval_config
        rows = []
        for name, values in summary.items():
            intervals = confidence_intervals(records[name], config)
            for metric, (low, high) in intervals.items():
                self.log(f"test/{name}/{metric}_ci_low", low, rank_zero_only=True)
                self.log(f"test/{name}/{metric}_ci_high", high, rank_zero_only=True)
            rows.append({"dataset": name, "problems": len(records[name]), **values, "ci": intervals})
        out = self._output_dir()
        for name, problem_rows in records.items():
            with open(out / f"{name}.jsonl", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in problem_rows)
        meta = {"model": self.init_from or self.model_path, "global_step": self.global_step, "eval": asdict(config)}
        (out / "summary.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
        print(format_table([{k: v for k, v in row.items() if k != "ci"} for row in rows]))
        rank_zero_info(f"evaluation written to {out}")


def _unwrapped_name(name: str) -> str:
    """A parameter's name without the wrapper modules FSDP1 and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name
