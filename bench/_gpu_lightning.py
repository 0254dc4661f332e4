"""The GPU check's Lightning pieces (bench/gpu_step.py): the strategies and precisions, the trainer, the step timer.

Strategies by name: ``fsdp2`` is Lightning's ModelParallelStrategy (vlm_post shards the models with FSDP2 in
``configure_model``, as ``model.fsdp`` says), ``fsdp1`` Lightning's FSDPStrategy (SFT only: RLModule refuses it),
``single`` one device (Lightning's "auto"). The step timer synchronises the GPU before every reading.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from pathlib import Path

from _gpu_log import log

STRATEGIES = ("fsdp2", "fsdp1", "single")


def precision_for(args, strategy_name: str) -> str:
    """``--precision`` if given; else 32-true under FSDP2 (its MixedPrecisionPolicy casts to bf16, as
    configs/geo3k do), bf16-mixed on a GPU under FSDP1 or on a single device, 32-true on a CPU."""
    if args.precision:
        return args.precision
    if strategy_name == "fsdp2" or args.accelerator != "gpu":
        return "32-true"
    return "bf16-mixed"


def fsdp_config(args):
    """``model.fsdp`` for the modules (read only under ModelParallelStrategy), as configs/geo3k/rl_qwen2_5_vl_7b.yaml."""
    from vlm_post.models.sharding import FSDPConfig

    param_dtype, reduce_dtype = (
        None if name == "none" else name for name in (args.fsdp_param_dtype, args.fsdp_reduce_dtype)
    )
    return FSDPConfig(reshard_after_forward=True, param_dtype=param_dtype, reduce_dtype=reduce_dtype, frozen="shard")


def strategy_for(args, strategy_name: str):
    """The Lightning strategy of a name in STRATEGIES, for one device."""
    if strategy_name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # One process: Lightning initialises the process group itself (nccl on a GPU, gloo on a CPU) and builds
        # a one-rank mesh of the accelerator's device type.
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    if strategy_name == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

        layers = {Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock}
        return FSDPStrategy(
            sharding_strategy="FULL_SHARD",
            auto_wrap_policy=layers,
            activation_checkpointing_policy=layers if args.checkpointing == "fsdp1" else None,
            state_dict_type="full",
        )
    return "auto"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_timer(stage: str, warmup: int, image_token_id: int, fail: bool = False):
    """``fail``: raise after the first step (a test hook for the fallback path, see GPU_STEP_FAIL_FIRST)."""
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        """Synchronised per-step times and the token counts of each step's batch."""

        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.current: dict = {}
            self.first_batch_at: float | None = None
            self.buffer_dtypes: dict[str, str] = {}
            self.placement: dict = {}

        def on_train_start(self, trainer, pl_module):
            # Where the strategy put things: RLModule puts rewards and masks on ``self.device`` (FSDP1 leaves it at
            # cpu, ModelParallelStrategy and a single device set it); FSDP2 keeps the master weights in
            # ``dtype`` and casts to ``fsdp.param_dtype`` per forward.
            param = next(pl_module.policy.parameters(), None)
            self.placement = {
                "module_device": str(pl_module.device),
                "root_device": str(trainer.strategy.root_device),
                "sharded_fsdp2": bool(getattr(pl_module, "sharded", False)),
                "param_type": type(param).__name__,
                "master_dtype": str(getattr(param, "dtype", None)),
            }
            log(f"{stage}: placement {self.placement}")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize()
            if self.first_batch_at is None:
                self.first_batch_at = time.perf_counter()
            self.current = {"index": len(self.steps), "gen_s": 0.0, "reward_s": 0.0}
            if "sft" in batch:
                sft = batch["sft"]
                self.current.update(
                    rows=int(sft["input_ids"].shape[0]),
                    width=int(sft["input_ids"].shape[1]),
                    seq_lens=[int(x) for x in sft["attention_mask"].sum(-1).tolist()],
                    head_tokens=int((sft["labels"][:, 1:] != -100).sum()),
                    image_tokens=int((sft["input_ids"] == image_token_id).sum()),
                    grids=sft["image_grid_thw"].tolist() if "image_grid_thw" in sft else [],
                )
            self.current["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize()
            step = self.current
            step["step_s"] = time.perf_counter() - step.pop("t0")
            if isinstance(outputs, dict) and outputs.get("loss") is not None:
                step["loss"] = float(outputs["loss"])
            metrics = trainer.callback_metrics
            for key in ("train/loss", "train/reward_mean", "train/kl", "train/entropy", "train/skipped_steps"):
                if key in metrics:
                    step[key.split("/", 1)[1]] = float(metrics[key])
            if not self.buffer_dtypes:  # FSDP1's mixed precision casts buffers too (rotary inv_freq); FSDP2's does not
                for name, buffer in trainer.strategy.model.named_buffers():
                    if name.endswith("inv_freq"):
                        self.buffer_dtypes[name] = str(buffer.dtype)
            self.steps.append(step)
            kind = "warm-up" if step["index"] < warmup else "timed"
            extra = ""
            if step.get("gen_s"):
                train_s = step["step_s"] - step["gen_s"] - step["reward_s"]
                extra = f", generate {step['gen_s']:.2f}s, reward {step['reward_s']:.2f}s, train {train_s:.2f}s"
            log(f"{stage} step {step['index']} ({kind}): {step['step_s']:.2f}s{extra}")
            if fail:
                raise RuntimeError(f"injected failure after {stage} step 0 (GPU_STEP_FAIL_FIRST)")

        def on_train_end(self, trainer, pl_module):
            # Measured: drop the optimizer states, gradients and reference now, so that the strategy's teardown
            # does not copy 45 GB of them to host memory (single-device teardown moves everything to the CPU).
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
            pl_module.zero_grad(set_to_none=True)
            if getattr(pl_module, "reference", None) is not None:
                object.__setattr__(pl_module, "reference", None)
                pl_module.bench_had_reference = True

    return StepTimer()


def timed_rl_module(timer, **kwargs):
    """An RLModule (``kwargs``: its options, the reward aside) whose rollout engine and reward are timed, keeping
    what the FLOP model needs: subclasses of the project's engine and reward, nothing patched."""
    from vlm_post.modules import RLModule
    from vlm_post.rewards import MathReward
    from vlm_post.rollout import HFGenerateEngine

    class TimedReward(MathReward):
        def __call__(self, responses, examples):
            started = time.perf_counter()
            try:
                return super().__call__(responses, examples)
            finally:
                timer.current["reward_s"] = timer.current.get("reward_s", 0.0) + time.perf_counter() - started

    class TimedEngine(HFGenerateEngine):
        def sample(self, policy, batch, params, logprobs=False, seed=None):
            prompt = batch["prompt"]
            shared = bool(not params.greedy and params.n > 1 and self._can_share_prefill(policy, prompt))
            synchronize()
            started = time.perf_counter()
            samples = super().sample(policy, batch, params, logprobs, seed)
            synchronize()
            step = timer.current
            step["gen_s"] = step.get("gen_s", 0.0) + time.perf_counter() - started
            n = samples.n
            prompt_lens = [int(x) for x in samples.prompt["attention_mask"].sum(-1).tolist()]
            grids = samples.prompt["image_grid_thw"].tolist() if "image_grid_thw" in samples.prompt else []
            per_prompt, start = [], 0  # each prompt's image grids, in order
            for count in samples.image_counts:
                per_prompt.append(grids[start : start + count])
                start += count
            row_prompt_lens = [p for p in prompt_lens for _ in range(n)]  # each prompt's figures once per sample
            row_grids = [g for images in per_prompt for _ in range(n) for g in images]
            response = samples.response_mask
            step.update(
                rows=int(response.shape[0]),
                decode_steps=int(response.shape[1]),
                response_tokens=int(response.sum()),
                response_lens=[int(x) for x in response.sum(-1).tolist()],
                prompt_lens=row_prompt_lens,
                grids=row_grids,
                finished=int(samples.finished.sum()),
                shared_prefill=shared,
                prefill_lens=prompt_lens if shared else row_prompt_lens,
                prefill_grids=grids if shared else row_grids,
            )
            return samples

    class TimedRL(RLModule):
        def __init__(self, **options) -> None:
            super().__init__(**options, reward=TimedReward())
            self.engine = TimedEngine(self.processor)

    return TimedRL(**kwargs)


def trainer_for(
    args, strategy_name: str, precision: str, max_steps: int, callbacks: list, gradient_clip_val: float | None
):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,
        strategy=strategy_for(args, strategy_name),
        max_steps=max_steps,
        max_epochs=-1,
        gradient_clip_val=gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(Path(args.workdir) / "runs"),
        deterministic=False,
        benchmark=False,
        use_distributed_sampler=False,
    )


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # The process group an FSDP attempt created stays: the next FSDP trainer reuses it (Lightning skips the
    # init when one exists), and re-creating one in the same process can trip over the old store's port.


def memory_figures() -> dict:
    import torch

    if torch.cuda.is_available():
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"peak_rss_gib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def release(trainer, module) -> None:
    """Drop what a failed attempt holds on the GPU (optimizer states, the reference, the wrapped model)."""
    with contextlib.suppress(Exception):  # best effort
        for optimizer in trainer.strategy.optimizers:
            optimizer.state.clear()
        trainer.strategy.optimizers = []
    if getattr(module, "reference", None) is not None:
        object.__setattr__(module, "reference", None)
    with contextlib.suppress(Exception):
        trainer.strategy.model = None
