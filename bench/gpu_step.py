"""One SFT step and one GRPO step of a Qwen2.5-VL-3B-shaped model, through vlm_post, timed on one GPU.

What runs (all through the project's own code, nothing re-implemented):
  1. a model folder: Qwen2_5_VLConfig at Qwen2.5-VL-3B's shape (text: hidden 2048, 36 layers, 16 heads,
     2 KV heads, MLP 11008, vocab 151,936, tied embeddings, rope theta 1e6, mrope [16, 24, 24]; vision:
     32 blocks of width 1280, MLP 3420, 16 heads, patch 14, merge 2, window 112, full attention in
     blocks 7/15/23/31, output 2048), RANDOM weights, written with ``save_pretrained`` in bf16 (as hub
     checkpoints are), with the real-vocabulary Qwen2.5-VL processor of artifacts/qwen2.5-vl-processor
     (tools/make_qwen_processor.py); token ids in the config are read from that tokenizer;
  2. synthetic data: vlm_post.data.synthetic.write_demo_dataset, plus a long ``solution`` column used as
     the SFT target (``data.target_column``) so that every SFT row is exactly ``--seq-len`` tokens
     (``max_target_tokens`` = seq-len - prompt length); images are resized by the data module
     (min_pixels = max_pixels = image-size^2: 448x448 -> 1024 patches -> 256 image tokens);
  3. SFTModule, then RLModule (GRPO, KL as a loss against a frozen reference, MathReward), each under a
     Lightning Trainer on 1 device, set up as configs/geo3k/rl_qwen2_5_vl_7b.yaml runs: strategy
     ModelParallelStrategy (data_parallel_size 1, tensor_parallel_size 1), where vlm_post's configure_model
     applies FSDP2 (``fully_shard`` on each Qwen2_5_VLDecoderLayer and Qwen2_5_VLVisionBlock, then the whole
     model; the reference model sharded the same way) with ``model.fsdp`` = FSDPConfig(param_dtype
     bfloat16, reduce_dtype float32), precision 32-true, ``model.dtype`` float32, gradient checkpointing
     (``model.gradient_checkpointing``), norm clipping at 1.0 (SFT trainer.gradient_clip_val, RL
     model.grad_clip). Lightning creates the one-rank process group itself (nccl on a GPU, gloo on a CPU).
     If a stage fails, the error is logged (and kept in the JSON, traceback included) and the stage is re-run
     on a single device (strategy "auto", bf16-mixed on a GPU), so the figures still come back.
     ``--strategy fsdp1`` measures SFT under Lightning's FSDPStrategy instead (FULL_SHARD, auto-wrap on the
     same blocks, bf16-mixed, as configs/geo3k/sft_qwen2_5_vl_7b.yaml; RL then stays on fsdp2, since
     RLModule refuses FSDP1); ``--strategy single`` measures both on one device without FSDP.

Precision: bf16 compute over fp32 weights, as configs/geo3k use. A real run trains at lr 1e-6..1e-5: an AdamW
update is ~lr relative to a weight, far below bf16's resolution (2^-8 = 0.4% relative), so with bf16-true most
updates round to nothing. Under FSDP2 the master weights and the Adam state stay fp32 (``model.dtype:
float32``, Lightning precision 32-true) and FSDP2's MixedPrecisionPolicy gathers each block's parameters in
bf16 for forward and backward and reduces the gradients in fp32 (``--fsdp-param-dtype``,
``--fsdp-reduce-dtype``); under FSDP1 and on a single device Lightning's bf16-mixed does the same (FSDP
MixedPrecision / autocast). The cost is memory (16 bytes/param of states: 60 GB at 3.75B) and a weight cast
per forward, both measured here. ``--precision bf16-true`` measures the other choice (``model.dtype``
bfloat16).

On one device there is nothing to shard: FSDP2's mesh has one rank (each block's all-gather is a copy and
the bf16 cast) and FSDP1's FULL_SHARD falls back to NO_SHARD (torch does it), so these figures show the
wrappers' overhead (per-block hooks, gathers, parameter casts), not sharding. Each stage's JSON records where
the strategy put things (``module_device``, ``root_device``, ``sharded_fsdp2``, the master weights' type
and dtype).

Measured per stage (steps after ``--warmup`` warm-up steps; every time is taken after
torch.cuda.synchronize):
  - step time: on_train_batch_start -> on_train_batch_end (the batch is already collated and on device);
  - tokens/s: non-padding tokens of the step's sequences (prompt text + image tokens + target/response);
  - RL: generation time (the rollout engine's ``generate``), reward time, and training time (the rest:
    reference log-probs, policy forward + backward over micro-batches, clipping, optimizer step);
  - peak GPU memory: torch.cuda.max_memory_allocated (and _reserved) over the stage, reset at its start;
  - MFU = model FLOPs / step time / peak, against 989 TFLOP/s (H100/H200 SXM dense bf16) and against
    790 TFLOP/s (the best bf16 matmul rate measured on that machine).

FLOP model (multiply-add = 2 FLOPs; counts from the built model's parameters):
  N_dec  = decoder parameters without the embedding (36 layers + final norm),
  N_head = V x d (the tied embedding used as output head), d = 2048, d_attn = heads x head_dim = 2048,
  N_vis  = vision patch embedding + 32 blocks (per 14x14 patch), N_merge = the 2x2 patch merger (per
           image token = per 4 patches), d_vis = 1280, L = 36 decoder layers.
  One forward over a batch:
    F = 2 N_dec T  +  2 N_head T_head  +  sum_rows 2 L d_attn s^2            (causal attention, QK^T and AV)
        + 2 N_vis P + 2 N_merge P/4  +  sum_images [ sum_window_layers sum_windows 4 d_vis w^2
                                                      + sum_full_layers 4 d_vis P_img^2 ]
    T = non-padding tokens, s = a row's length, T_head = tokens projected onto the vocabulary (our
    chunked losses project only the SFT target / RL response positions), P = image patches, w = patches
    per attention window (64 at window 112), P_img = patches of one image.
  SFT step  = 3 F   (forward + backward; gradient checkpointing's recomputation and the loss's logit
                     recomputation are not counted: this is MFU, not hardware utilisation).
  RL training = (1 reference forward + 3 policy) F over the B x n prompt+response rows (plus 1 F for
                old log-probs when the rollout batch gets more than one update; not with these settings).
  Generation  = prefill 2 N_dec p + 2 N_head + vision forward, once per prompt when the rollout engine
                shares the prefill across the n samples (HFGenerateEngine does for Qwen2.5-VL), else per row,
                + per decode step and row 2 N_dec + 2 N_head + 4 L d_attn c (c = the context length at that
                step), for every row at every step until generation ends.
  RL step MFU counts generation + training FLOPs over the whole step time.

Run on the GPU machine (bench/gpu_check.sh does it under a timeout, with the wheels it needs):
    python3 bench/gpu_step.py --size 3b --out $OUT/gpu_step.json --workdir /tmp/gpu
Test the same code path on a CPU (--size tiny: a narrow model, the real vocabulary; the same FSDP2 path over a
one-rank gloo group; about 3.5 minutes on one thread, as bf16 matmuls are ~10x slower than fp32 on a CPU without
bf16 instructions; ``--fsdp-param-dtype none`` computes in fp32, about a minute):
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_step.py --size tiny --out /tmp/gpu_step.json --workdir /tmp/gpu_tiny
The last line reads ``sft_tokens_per_s=... sft_mfu=... rl_step_s=... rl_gen_frac=... rl_mfu=...``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never try the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # vlm_post from this checkout, installed or not

# The pieces, beside this script (its folder is on sys.path): each imports torch, transformers and vlm_post only
# when called, so the environment above is set first.
from _gpu_data import datamodule, prompt_length, write_data
from _gpu_figures import FlopModel, print_table, summarise
from _gpu_lightning import (
    STRATEGIES,
    free_memory,
    fsdp_config,
    make_timer,
    memory_figures,
    precision_for,
    release,
    synchronize,
    timed_rl_module,
    trainer_for,
)
from _gpu_log import T0, log
from _gpu_model import SHAPES, build_model_folder

# Per size: SFT rows x tokens, RL prompts x samples x new tokens, steps. The 3b defaults fit the GPU
# check's budget (the whole script in under 5 minutes on an H200).
DEFAULTS = {
    "3b": {
        "batch_size": 8,
        "seq_len": 1024,
        "steps": 5,
        "warmup": 2,
        "rl_batch_size": 2,
        "n": 8,
        "max_new_tokens": 256,
        "rl_steps": 3,
        "rl_warmup": 1,
        "micro_batch_size": 8,
        "image_size": 448,
    },
}
DEFAULTS["tiny"] = DEFAULTS["3b"] | {  # the rest as at 3b
    "batch_size": 2,
    "seq_len": 512,
    "steps": 2,
    "warmup": 1,
    "n": 4,
    "max_new_tokens": 16,
    "rl_steps": 2,
}


# --- one stage ----------------------------------------------------------------------------------------


def run_stage(
    args,
    stage: str,
    strategy_name: str,
    model_dir: Path,
    data_path: Path,
    flops: FlopModel,
    ids: dict,
    extra: dict,
    fail: bool = False,
) -> dict:
    """One attempt at a stage under one strategy: returns its figures (raises on failure)."""
    import torch
    from lightning.pytorch import seed_everything

    from vlm_post.losses import GRPOLossConfig
    from vlm_post.modules import SFTModule
    from vlm_post.modules.base import OptimConfig
    from vlm_post.rollout import SamplingParams

    seed_everything(args.seed, workers=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    precision = precision_for(args, strategy_name)
    fsdp = fsdp_config(args)  # read by the modules only under ModelParallelStrategy (fsdp2)
    common = {
        "model_name_or_path": str(model_dir),
        "dtype": "bfloat16" if precision == "bf16-true" else "float32",
        "attn_implementation": "sdpa",
        "gradient_checkpointing": args.checkpointing == "hf",
        "logprob_chunk_size": 1024,
        "fsdp": fsdp,
    }
    started = time.perf_counter()
    if stage == "sft":
        warmup, steps = args.warmup, args.steps
        timer = make_timer("sft", warmup, ids["image_token_id"], fail)
        module = SFTModule(**common, optim=OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant"))
        dm = datamodule(args, data_path, args.batch_size, max_target_tokens=extra["max_target_tokens"])
        clip = 1.0
    else:
        warmup, steps = args.rl_warmup, args.rl_steps
        timer = make_timer("rl", warmup, ids["image_token_id"], fail)
        module = timed_rl_module(
            timer,
            **common,
            optim=OptimConfig(lr=1e-6, weight_decay=1e-2, warmup_steps=0, schedule="constant"),
            rollout=SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
            loss=GRPOLossConfig(kl_mode=args.kl_mode, kl_kind="low_var_kl", kl_coef=1e-2),
            micro_batch_size=args.micro_batch_size,
            epochs=1,
            grad_clip=1.0,
        )
        dm = datamodule(args, data_path, args.rl_batch_size)
        clip = None  # RL steps the optimizer itself and clips with model.grad_clip
    fsdp_note = f" (fsdp {asdict(fsdp)})" if strategy_name == "fsdp2" else ""
    log(f"{stage}: strategy {strategy_name}{fsdp_note}, precision {precision}, {warmup} warm-up + {steps} timed steps")
    trainer = trainer_for(args, strategy_name, precision, warmup + steps, [timer], clip)
    try:
        trainer.fit(module, datamodule=dm)
    except BaseException:
        release(trainer, module)
        raise
    synchronize()
    total_s = time.perf_counter() - started
    figures = summarise(stage, timer, warmup, flops, module, args)
    figures.update(
        strategy=strategy_name,
        precision=precision,
        fsdp=asdict(fsdp) if strategy_name == "fsdp2" else None,
        checkpointing=args.checkpointing,
        stage_total_s=total_s,
        setup_s=(timer.first_batch_at or time.perf_counter()) - started,
        buffer_dtypes=timer.buffer_dtypes,
        **timer.placement,
        **memory_figures(),
    )
    if stage == "rl":
        figures["reference_model"] = bool(getattr(module, "bench_had_reference", False))
    del trainer, module, dm, timer
    return figures


# --- main ---------------------------------------------------------------------------------------------


def environment() -> dict:
    import lightning
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "host_cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, bf16=torch.cuda.is_bf16_supported())
    return info


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, help="timed SFT steps (3b: 5, tiny: 2)")
    parser.add_argument("--warmup", type=int, help="SFT warm-up steps, not timed (3b: 2, tiny: 1)")
    parser.add_argument("--rl-steps", type=int, help="timed RL steps (3b: 3, tiny: 2)")
    parser.add_argument("--rl-warmup", type=int, help="RL warm-up steps (default 1)")
    parser.add_argument("--batch-size", type=int, help="SFT rows per step (3b: 8, tiny: 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per SFT row, prompt + target (3b: 1024, tiny: 512)")
    parser.add_argument("--rl-batch-size", type=int, help="prompts per RL step (default 2)")
    parser.add_argument("--n", type=int, help="samples per prompt, the GRPO group (3b: 8, tiny: 4)")
    parser.add_argument("--max-new-tokens", type=int, help="RL response length (3b: 256, tiny: 16)")
    parser.add_argument("--micro-batch-size", type=int, help="RL rows per forward/backward (default 8)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default 448: 256 image tokens)")
    parser.add_argument(
        "--kl-mode", choices=["loss", "off"], default="loss", help="loss: with a frozen reference model"
    )
    parser.add_argument(
        "--precision", help="all attempts (default: 32-true under fsdp2, else bf16-mixed on GPU, 32-true on CPU)"
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fsdp2",
        help="first try: fsdp2 (ModelParallelStrategy + model.fsdp, default), fsdp1 (FSDPStrategy), single",
    )
    parser.add_argument(
        "--rl-strategy",
        choices=[s for s in STRATEGIES if s != "fsdp1"],  # RLModule refuses FSDP1
        help="first try for RL (default: --strategy; fsdp2 when that is fsdp1)",
    )
    parser.add_argument(
        "--fsdp-param-dtype",
        choices=["bfloat16", "float32", "float16", "none"],
        default="bfloat16",
        help="fsdp2: model.fsdp.param_dtype, the compute dtype over the fp32 master weights (none: as stored)",
    )
    parser.add_argument(
        "--fsdp-reduce-dtype",
        choices=["float32", "bfloat16", "none"],
        default="float32",
        help="fsdp2: model.fsdp.reduce_dtype, the gradient reduction dtype (none: param dtype)",
    )
    parser.add_argument("--no-fallback", action="store_true", help="do not re-run a failed stage on a single device")
    parser.add_argument(
        "--checkpointing",
        choices=["hf", "fsdp1", "off"],
        default="hf",
        help="activation checkpointing: the module's (model.gradient_checkpointing), Lightning FSDP1's, or none",
    )
    parser.add_argument("--stages", default="sft,rl")
    parser.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto")
    parser.add_argument("--processor", default=str(REPO / "artifacts" / "qwen2.5-vl-processor"))
    parser.add_argument("--workdir", default="/tmp/vlm_post_gpu_step")
    parser.add_argument("--out", default=None, help="JSON with every figure (written after each stage)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model folder even if it matches")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no new attempt after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would flood the log
    args.accelerator = (
        "gpu" if (args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    )
    args.rl_strategy = args.rl_strategy or ("fsdp2" if args.strategy == "fsdp1" else args.strategy)
    firsts = {"sft": args.strategy, "rl": args.rl_strategy}
    if unknown := [s for s in args.stages.split(",") if s and s not in firsts]:
        raise SystemExit(f"--stages: unknown {unknown}; choose from sft, rl")
    if args.checkpointing == "fsdp1" and any(firsts.get(s) != "fsdp1" for s in args.stages.split(",") if s):
        raise SystemExit("--checkpointing fsdp1 needs --strategy fsdp1 and --stages sft (RL refuses FSDP1)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) if args.out else None
    notes: list[str] = []
    report: dict = {"args": {k: v for k, v in vars(args).items()}, "environment": environment(), "notes": notes}

    def save() -> None:
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    log(f"environment: {json.dumps(report['environment'])}")
    log(
        f"settings: size {args.size}, accelerator {args.accelerator}, strategy {args.strategy} (RL "
        f"{args.rl_strategy}), precision {precision_for(args, args.strategy)}"
    )
    save()

    model_dir = workdir / f"model-{args.size}"
    report["build"] = build_model_folder(args, model_dir, notes)
    ids = report["build"]["token_ids"]
    flops = FlopModel(args.size, report["build"]["params"])
    p = report["build"]["params"]
    vision = p["vision_patch_embed"] + p["vision_blocks"] + p["vision_merger"]
    log(
        f"parameters: total {p['total'] / 1e6:.1f}M, decoder (non-embedding) {p['decoder'] / 1e6:.1f}M, embedding "
        f"{p['embedding'] / 1e6:.1f}M (tied head), vision {vision / 1e6:.1f}M"
    )
    save()

    stages = [s for s in args.stages.split(",") if s]
    rows = max(
        64, args.batch_size * (args.warmup + args.steps) * 2, args.rl_batch_size * (args.rl_warmup + args.rl_steps) * 2
    )
    data_path = write_data(args, workdir / "data", rows)
    prompt_tokens, full_tokens = prompt_length(args, model_dir, data_path)
    if prompt_tokens + 8 > args.seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} leaves no room for a target after the {prompt_tokens}-token prompt")
    if full_tokens < args.seq_len:
        raise SystemExit(f"the synthetic target is too short: {full_tokens} tokens < --seq-len {args.seq_len}")
    extra = {"max_target_tokens": args.seq_len - prompt_tokens}
    report["data"] = {
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "sft_target_tokens": extra["max_target_tokens"],
        "path": str(data_path),
    }
    log(
        f"data: {rows} rows, prompt {prompt_tokens} tokens (image {args.image_size}x{args.image_size}), "
        f"SFT target {extra['max_target_tokens']} tokens"
    )
    save()

    for stage in stages:
        first = firsts[stage]
        injected = stage in os.environ.get("GPU_STEP_FAIL_FIRST", "").split(",")  # test hook: fail, then fall back
        attempts = [first] + ([] if args.no_fallback or (first == "single" and not injected) else ["single"])
        report[stage] = {"attempts": []}
        for strategy_name in attempts:
            elapsed = time.perf_counter() - T0
            if elapsed > args.budget_s:
                notes.append(
                    f"{stage}/{strategy_name} not started: {elapsed:.0f}s elapsed > budget {args.budget_s:.0f}s"
                )
                log(notes[-1])
                break
            attempt = {"strategy": strategy_name, "started_at_s": elapsed}
            error = None
            fail = injected and not report[stage]["attempts"]
            try:
                figures = run_stage(args, stage, strategy_name, model_dir, data_path, flops, ids, extra, fail)
            except Exception as exc:  # noqa: BLE001 - any failure is a finding: log it, keep going
                error = f"{type(exc).__name__}: {exc}"
                attempt.update(ok=False, error=error, traceback=traceback.format_exc(limit=30))
                del exc
            if error is None:
                attempt.update(ok=True)
                report[stage]["result"] = figures
            attempt["seconds"] = time.perf_counter() - T0 - attempt["started_at_s"]
            report[stage]["attempts"].append(attempt)
            free_memory()
            attempt["live_models_after"] = sum(  # a failed attempt must not keep its model alive
                1 for o in gc.get_objects() if type(o).__name__ == "Qwen2_5_VLForConditionalGeneration"
            )
            if torch.cuda.is_available():  # what a failed attempt may have left behind
                attempt["gpu_allocated_after_gib"] = torch.cuda.memory_allocated() / 2**30
            save()
            if error is None:
                log(f"{stage}/{strategy_name}: done in {attempt['seconds']:.1f}s")
                break
            log(f"{stage}/{strategy_name} FAILED after {attempt['seconds']:.1f}s: {error}")
            print(attempt["traceback"], flush=True)

    print_table(report)
    report["total_s"] = time.perf_counter() - T0
    save()
    sft, rl = report.get("sft", {}).get("result") or {}, report.get("rl", {}).get("result") or {}
    failed = [f"{s}/{a['strategy']}" for s in stages for a in report.get(s, {}).get("attempts", []) if not a.get("ok")]
    log(f"total {report['total_s']:.1f}s" + (f"; failed attempts: {', '.join(failed)}" if failed else ""))
    print(
        f"sft_tokens_per_s={sft.get('tokens_per_s', float('nan')):.1f} sft_mfu={sft.get('mfu_989', float('nan')):.4f} "
        f"rl_step_s={rl.get('step_s', float('nan')):.3f} rl_gen_frac={rl.get('gen_fraction', float('nan')):.3f} "
        f"rl_mfu={rl.get('mfu_989', float('nan')):.4f} sft_strategy={sft.get('strategy', 'none')} "
        f"rl_strategy={rl.get('strategy', 'none')}",
        flush=True,
    )
    return 0 if all(report.get(s, {}).get("result") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
