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
     Lightning Trainer: accelerator gpu, 1 device, precision bf16-mixed, FSDPStrategy (FULL_SHARD, auto-wrap
     on Qwen2_5_VLDecoderLayer and Qwen2_5_VLVisionBlock, as configs/geo3k/*.yaml), gradient checkpointing.
     If a stage fails under FSDP, the error is logged (and kept in the JSON) and the stage is re-run on a
     single device (strategy "auto"), so the figures still come back.

Precision: bf16-mixed, with fp32 parameters (``model.dtype: float32``), as configs/geo3k use. A real run
trains at lr 1e-6..1e-5: an AdamW update is ~lr relative to a weight, far below bf16's resolution
(2^-8 = 0.4% relative), so with bf16-true most updates round to nothing; bf16-mixed keeps fp32 master
weights and fp32 Adam state and runs the matmuls in bf16 (FSDP MixedPrecision / autocast). The cost is
memory (16 bytes/param of states: 60 GB at 3.75B) and a weight cast per forward, both measured here.
``--precision bf16-true`` measures the other choice.

Two things in Lightning's FSDP would stop vlm_post before anything is measured; BenchSFT / BenchRL below
work around them outside vlm_post (no-ops on a single device; each use is recorded in the JSON):
  - Lightning's FSDP does not clip gradients by norm (FSDPPrecision.clip_grad_by_norm raises), which both
    real configs ask for (SFT trainer.gradient_clip_val 1.0, RL model.grad_clip 1.0): clip through the FSDP
    root's own ``clip_grad_norm_`` instead (``--lightning-clip`` keeps Lightning's path, to see the error);
  - ``LightningModule.device`` stays ``cpu`` under FSDP (FSDP moves parameters itself, never through
    ``Module.to``), and RLModule puts the reference model and the rewards on ``self.device``: set it to the
    GPU in on_fit_start (``--lightning-device`` keeps Lightning's value).
RL under Lightning's FSDP is expected to fail even so: Lightning runs training_step inside the root FSDP
unit's forward, and RLModule calls manual_backward there, before that forward returns; FSDP1 then finds the
root's parameters (embedding/head, norms, vision patch embedding and merger) still in their forward state
and asserts. The error is logged and the stage re-runs on one device; the JSON keeps the traceback.
On one device FULL_SHARD falls back to NO_SHARD (torch does it), so FSDP figures show the wrapper's
overhead (per-layer hooks, parameter casts), not sharding.

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
Test the same code path on a CPU (about a minute at --size tiny: a narrow model, the real vocabulary):
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_step.py --size tiny --out /tmp/gpu_step.json --workdir /tmp/gpu_tiny
The last line reads ``sft_tokens_per_s=... sft_mfu=... rl_step_s=... rl_gen_frac=... rl_mfu=...``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import time
import traceback
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

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
MEASURED_FLOPS = 790e12  # the best bf16 matmul rate measured on the H200 we use
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


# --- model shapes -------------------------------------------------------------------------------------

QWEN_VOCAB = 151936  # Qwen2.5's embedding rows (151,665 tokens, padded)

SHAPES = {
    # Qwen/Qwen2.5-VL-3B-Instruct's config.json
    "3b": dict(
        text=dict(
            hidden_size=2048,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=2048,
            tokens_per_second=2,
        ),
    ),
    # The same structure, narrow enough for a CPU: the real vocabulary, so the head and the tokenizer are real.
    "tiny": dict(
        text=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision=dict(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1, 3],
            out_hidden_size=64,
            tokens_per_second=2,
        ),
    ),
}

# Per size: SFT rows x tokens, RL prompts x samples x new tokens, steps. The 3b defaults fit the GPU
# check's budget (the whole script in under 5 minutes on an H200).
DEFAULTS = {
    "3b": dict(
        batch_size=8, seq_len=1024, steps=5, warmup=2, rl_batch_size=2, n=8, max_new_tokens=256,
        rl_steps=3, rl_warmup=1, micro_batch_size=8, image_size=448,
    ),
    "tiny": dict(
        batch_size=2, seq_len=512, steps=2, warmup=1, rl_batch_size=2, n=4, max_new_tokens=16,
        rl_steps=2, rl_warmup=1, micro_batch_size=8, image_size=448,
    ),
}


def processor_and_ids(processor_dir: Path, notes: list[str]):
    """The processor to ship with the model, and the token ids the model config must use."""
    from transformers import AutoProcessor

    if (processor_dir / "tokenizer.json").is_file():
        processor = AutoProcessor.from_pretrained(str(processor_dir))
        source = f"real Qwen2.5 vocabulary ({processor_dir})"
    else:  # no real vocabulary at hand: the tiny tokenizer, still with a 151,936-row model
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        from vlm_post.models.tiny import CHAT_TEMPLATE, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056),
            chat_template=CHAT_TEMPLATE,
        )
        source = "tiny tokenizer (no real-vocabulary processor found): text token counts are not Qwen's"
        notes.append(f"{processor_dir} missing: {source}")
        log(f"WARNING: {processor_dir} not found; using the tiny tokenizer with a {QWEN_VOCAB}-row model")
    tok = processor.tokenizer
    ids = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("eos", "<|im_end|>"),
            ("pad", "<|endoftext|>"),
        ]
    }
    if len(tok) > QWEN_VOCAB:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, more than the model's {QWEN_VOCAB} rows")
    return processor, ids, source


def model_config(size: str, ids: dict):
    from transformers import Qwen2_5_VLConfig

    shape = SHAPES[size]
    return Qwen2_5_VLConfig(
        text_config=dict(
            shape["text"],
            vocab_size=QWEN_VOCAB,
            hidden_act="silu",
            bos_token_id=ids["pad"],  # Qwen's config: bos = <|endoftext|> (never prepended by the tokenizer)
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        vision_config=dict(shape["vision"], hidden_act="silu"),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=True,
    )


def parameter_counts(config) -> dict[str, int]:
    """Parameters by part, from the model built on the meta device (no memory, no init)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    counts = dict(embedding=0, lm_head_untied=0, decoder=0, vision_patch_embed=0, vision_blocks=0, vision_merger=0, other=0)
    for name, param in model.named_parameters():  # tied weights are listed once
        n = param.numel()
        if "embed_tokens" in name:
            counts["embedding"] += n
        elif name.startswith("lm_head"):
            counts["lm_head_untied"] += n
        elif ".visual.patch_embed" in name:
            counts["vision_patch_embed"] += n
        elif ".visual.blocks" in name:
            counts["vision_blocks"] += n
        elif ".visual.merger" in name:
            counts["vision_merger"] += n
        elif ".language_model." in name:
            counts["decoder"] += n
        else:
            counts["other"] += n
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_model_folder(args, out: Path, notes: list[str]) -> dict:
    """Config + random bf16 weights (save_pretrained) + processor in ``out``; reused when it matches."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    started = time.perf_counter()
    processor, ids, source = processor_and_ids(Path(args.processor), notes)
    config = model_config(args.size, ids)
    signature = {"size": args.size, "ids": ids, "processor": source, "seed": args.seed}
    marker = out / "bench_model.json"
    counts = parameter_counts(config)
    if marker.is_file() and json.loads(marker.read_text()).get("signature") == signature and not args.rebuild:
        log(f"model folder {out} already built for this configuration: reused")
        return dict(reused=True, seconds=time.perf_counter() - started, params=counts, token_ids=ids, processor=source)
    if out.exists():
        shutil.rmtree(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"building the {args.size} model ({counts['total'] / 1e9:.3f}B parameters) with random weights on {device}")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.bos_token_id = ids["pad"]
    built = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    saved_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    marker.write_text(json.dumps({"signature": signature, "params": counts}, indent=2) + "\n")
    result = dict(
        reused=False,
        init_s=built - started,
        save_s=time.perf_counter() - built,
        seconds=time.perf_counter() - started,
        saved_gib=saved_bytes / 2**30,
        params=counts,
        token_ids=ids,
        processor=source,
    )
    log(f"model folder written: {saved_bytes / 2**30:.2f} GiB in {result['seconds']:.1f}s (init {result['init_s']:.1f}s)")
    return result


# --- data ---------------------------------------------------------------------------------------------


def long_solution(rng, sentences: int) -> str:
    """A long, varied reasoning-like text (the synthetic task's answers are a few tokens)."""
    colors = ["red", "blue"]
    parts = ["<think>"]
    for step in range(sentences):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = colors[rng.randint(0, 1)]
        parts.append(
            f"Step {step + 1}: the {c} bar starts at x = {rng.randint(0, 9)} and ends near x = {a}, while the other "
            f"one ends near x = {b}; the difference is {abs(a - b)} pixels, about {abs(a - b) / 112:.3f} of the width."
        )
    parts.append("</think> \\boxed{red}")
    return " ".join(parts)


def write_data(args, data_dir: Path, rows: int) -> Path:
    """write_demo_dataset, plus a ``solution`` column long enough for ``--seq-len``-token SFT rows."""
    import random

    import datasets

    from vlm_post.data.synthetic import write_demo_dataset

    write_demo_dataset(data_dir, train=rows, validation=1, test=1, seed=args.seed)
    rng = random.Random(args.seed)
    table = datasets.Dataset.from_parquet(str(data_dir / "train.parquet"), cache_dir=str(data_dir / "cache"))
    sentences = max(8, args.seq_len // 16)  # ~35 tokens per sentence: ~2x the longest target needed
    table = table.add_column("solution", [long_solution(rng, sentences) for _ in range(len(table))])
    path = data_dir / "train_long.parquet"
    table.to_parquet(str(path))
    return path


def datamodule(args, path: Path, batch_size: int, max_target_tokens: int | None = None):
    from vlm_post.data import DataSource, VLMDataModule

    pixels = args.image_size * args.image_size
    return VLMDataModule(
        train=DataSource(name="bench_train", kind="geometry3k", path=str(path)),
        batch_size=batch_size,
        num_workers=0,
        target_column="solution",
        max_target_tokens=max_target_tokens,
        min_pixels=pixels,
        max_pixels=pixels,
        seed=args.seed,
    )


def prompt_length(args, model_dir: Path, path: Path) -> tuple[int, int]:
    """Tokens of one prompt (chat template + image tokens) and of its long target, through vlm_post's collator."""
    from transformers import AutoProcessor

    dm = datamodule(args, path, 1)
    dm.processor = AutoProcessor.from_pretrained(str(model_dir))
    example = dm._dataset(dm.train_source)[0]
    batch = dm.collator(True, True)([example])
    return int(batch["prompt"]["attention_mask"].sum()), int(batch["sft"]["attention_mask"].sum())


# --- FLOPs --------------------------------------------------------------------------------------------


class FlopModel:
    """The FLOP formulas of the module docstring, from the model's parameter counts and config."""

    def __init__(self, size: str, params: dict) -> None:
        text, vision = SHAPES[size]["text"], SHAPES[size]["vision"]
        self.n_dec = params["decoder"]
        self.n_head = QWEN_VOCAB * text["hidden_size"]
        self.n_vis = params["vision_patch_embed"] + params["vision_blocks"]
        self.n_merge = params["vision_merger"]
        self.layers = text["num_hidden_layers"]
        self.d_attn = text["hidden_size"]  # heads x head_dim
        self.d_vis = vision["hidden_size"]
        self.depth = vision["depth"]
        self.full_layers = len(vision["fullatt_block_indexes"])
        self.merge = vision["spatial_merge_size"]
        self.window_units = vision["window_size"] // vision["spatial_merge_size"] // vision["patch_size"]

    def vision_forward(self, grids: list[list[int]]) -> float:
        flops = 0.0
        for t, h, w in grids:
            patches = t * h * w
            flops += 2 * self.n_vis * patches + 2 * self.n_merge * patches / (self.merge**2)
            # windows of window_units x window_units merged tokens (4 patches each), cut at the edges
            hm, wm = h // self.merge, w // self.merge
            rows = [min(self.window_units, hm - i) for i in range(0, hm, self.window_units)]
            cols = [min(self.window_units, wm - j) for j in range(0, wm, self.window_units)]
            window_sq = t * sum((r * c * self.merge**2) ** 2 for r in rows for c in cols)
            flops += (self.depth - self.full_layers) * 4 * self.d_vis * window_sq
            flops += self.full_layers * 4 * self.d_vis * patches**2
        return flops

    def forward(self, seq_lens: list[int], head_tokens: int, grids: list[list[int]]) -> float:
        tokens = sum(seq_lens)
        attention = sum(2 * self.layers * self.d_attn * s * s for s in seq_lens)
        return 2 * self.n_dec * tokens + 2 * self.n_head * head_tokens + attention + self.vision_forward(grids)

    def generation(self, prefill_lens: list[int], prefill_grids: list[list[int]], prompt_lens: list[int], steps: int) -> float:
        """Prefill of ``prefill_lens`` sequences (each prompt once when the engine shares the prefill across its
        n samples, else every row) + ``steps`` decode steps of every row (``prompt_lens``: one per row)."""
        flops = self.forward(prefill_lens, len(prefill_lens), prefill_grids)
        for p in prompt_lens:
            for step in range(steps):
                context = p + step + 1
                flops += 2 * self.n_dec + 2 * self.n_head + 4 * self.layers * self.d_attn * context
        return flops


# --- Lightning pieces ---------------------------------------------------------------------------------


def fsdp_root(module):
    """The FSDP-wrapped root when the run uses FSDP (Lightning wraps the whole LightningModule), else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = module.trainer.strategy.model
    return model if isinstance(model, FullyShardedDataParallel) else None


def fix_device(module) -> None:
    """Under FSDP Lightning never updates ``LightningModule.device`` (FSDP moves the parameters itself, not
    through ``Module.to``), so it stays ``cpu``; RLModule uses ``self.device`` for the reference model and the
    rewards. Set it to the strategy's device, as single-device training has it."""
    from lightning.fabric.utilities.device_dtype_mixin import _update_properties

    root_device = module.trainer.strategy.root_device
    if module.device != root_device:
        note = f"LightningModule.device was {module.device} under {type(module.trainer.strategy).__name__}: set to {root_device}"
        module.bench_workarounds.append(note)
        log(f"workaround: {note}")
        _update_properties(module, device=root_device)


def bench_modules(lightning_clip: bool, lightning_device: bool):
    """SFTModule / RLModule with two FSDP workarounds (see the docstring): gradient clipping by norm through the
    FSDP root, and a correct ``self.device``. Both are no-ops on a single device."""
    from vlm_post.modules.rl import RLModule
    from vlm_post.modules.sft import SFTModule

    def clip(module, gradient_clip_val) -> bool:
        root = None if lightning_clip else fsdp_root(module)
        if root is None or not gradient_clip_val:
            return False
        if not module.bench_workarounds or "clip" not in module.bench_workarounds[-1]:
            module.bench_workarounds.append("gradient clipping by norm through the FSDP root's clip_grad_norm_")
        root.clip_grad_norm_(gradient_clip_val)
        return True

    class BenchSFT(SFTModule):
        bench_workarounds: list

        def on_fit_start(self) -> None:
            if not lightning_device:
                fix_device(self)
            super().on_fit_start()

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if not clip(self, gradient_clip_val):
                super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    class BenchRL(RLModule):
        bench_workarounds: list

        def on_fit_start(self) -> None:
            if not lightning_device:
                fix_device(self)
            super().on_fit_start()  # moves the reference model to self.device

        def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if not clip(self, gradient_clip_val):
                super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    return BenchSFT, BenchRL


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

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize()
            if self.first_batch_at is None:
                self.first_batch_at = time.perf_counter()
            self.current = {"index": len(self.steps), "gen_s": 0.0, "reward_s": 0.0}
            self.current["image_counts"] = [int(c) for c in batch.get("image_counts", [])]
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
            if not self.buffer_dtypes:  # FSDP mixed precision casts buffers too (rotary inv_freq)
                for name, buffer in trainer.strategy.model.named_buffers():
                    if name.endswith("inv_freq"):
                        self.buffer_dtypes[name] = str(buffer.dtype)
            self.steps.append(step)
            kind = "warm-up" if step["index"] < warmup else "timed"
            extra = (
                f", generate {step['gen_s']:.2f}s, reward {step['reward_s']:.2f}s, train {step['step_s'] - step['gen_s'] - step['reward_s']:.2f}s"
                if step.get("gen_s")
                else ""
            )
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


def instrument_rl(module, timer) -> None:
    """Time the rollout engine's generate and the reward function, and keep what the FLOP model needs."""
    engine, reward_fn = module.engine, module.reward_fn
    generate = engine.generate

    def timed_generate(policy, prompt, params):
        share = getattr(engine, "_can_share_prefill", None)
        shared = bool(share is not None and not params.greedy and params.n > 1 and share(policy, prompt))
        synchronize()
        started = time.perf_counter()
        samples = generate(policy, prompt, params)
        synchronize()
        step = timer.current
        step["gen_s"] = step.get("gen_s", 0.0) + time.perf_counter() - started
        n = params.n
        counts = timer.current.get("image_counts") or None
        prompt_lens = [int(x) for x in prompt["attention_mask"].sum(-1).tolist()]
        grids = prompt["image_grid_thw"].tolist() if "image_grid_thw" in prompt else []
        # images per prompt: the grids in order, image_counts[i] of them for prompt i
        per_prompt, start = [], 0
        for count in counts or [len(grids) // max(1, len(prompt_lens))] * len(prompt_lens):
            per_prompt.append(grids[start : start + count])
            start += count
        response = samples.response_mask
        step.update(
            rows=int(response.shape[0]),
            decode_steps=int(response.shape[1]),
            response_tokens=int(response.sum()),
            response_lens=[int(x) for x in response.sum(-1).tolist()],
            prompt_lens=[p for p in prompt_lens for _ in range(n)],
            grids=[g for images in per_prompt for _ in range(n) for g in images],
            finished=int(samples.finished.sum()),
            shared_prefill=shared,
            prefill_lens=prompt_lens if shared else [p for p in prompt_lens for _ in range(n)],
            prefill_grids=grids if shared else [g for images in per_prompt for _ in range(n) for g in images],
        )
        return samples

    def timed_reward(texts, examples):
        started = time.perf_counter()
        out = reward_fn(texts, examples)
        timer.current["reward_s"] = timer.current.get("reward_s", 0.0) + time.perf_counter() - started
        return out

    engine.generate = timed_generate
    module.reward_fn = timed_reward


# --- one stage ----------------------------------------------------------------------------------------


def trainer_for(args, strategy_name: str, max_steps: int, callbacks: list, gradient_clip_val: float | None):
    from lightning.pytorch import Trainer

    if strategy_name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

        layers = {Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock}
        strategy = FSDPStrategy(
            sharding_strategy="FULL_SHARD",
            auto_wrap_policy=layers,
            activation_checkpointing_policy=layers if args.checkpointing == "fsdp" else None,
            state_dict_type="full",
        )
    else:
        strategy = "auto"
    return Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        strategy=strategy,
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
    try:
        for optimizer in trainer.strategy.optimizers:
            optimizer.state.clear()
        trainer.strategy.optimizers = []
    except Exception:  # noqa: BLE001 - best effort
        pass
    if getattr(module, "reference", None) is not None:
        object.__setattr__(module, "reference", None)
    try:
        trainer.strategy.model = None
    except Exception:  # noqa: BLE001
        pass


def run_stage(
    args, stage: str, strategy_name: str, model_dir: Path, data_path: Path, flops: FlopModel, ids: dict, extra: dict,
    fail: bool = False,
) -> dict:
    """One attempt at a stage under one strategy: returns its figures (raises on failure)."""
    import torch
    from lightning.pytorch import seed_everything

    from vlm_post.losses import GRPOLossConfig
    from vlm_post.modules.base import OptimConfig
    from vlm_post.rollout import SamplingParams

    seed_everything(args.seed, workers=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    BenchSFT, BenchRL = bench_modules(args.lightning_clip, args.lightning_device)
    common = dict(
        model_name_or_path=str(model_dir),
        dtype="bfloat16" if args.precision == "bf16-true" else "float32",
        attn_implementation="sdpa",
        gradient_checkpointing=args.checkpointing == "hf",
        logprob_chunk_size=1024,
    )
    started = time.perf_counter()
    if stage == "sft":
        warmup, steps = args.warmup, args.steps
        timer = make_timer("sft", warmup, ids["image_token_id"], fail)
        module = BenchSFT(**common, optim=OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant"))
        dm = datamodule(args, data_path, args.batch_size, max_target_tokens=extra["max_target_tokens"])
        clip = 1.0
    else:
        warmup, steps = args.rl_warmup, args.rl_steps
        timer = make_timer("rl", warmup, ids["image_token_id"], fail)
        module = BenchRL(
            **common,
            optim=OptimConfig(lr=1e-6, weight_decay=1e-2, warmup_steps=0, schedule="constant"),
            rollout=SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
            loss=GRPOLossConfig(kl_mode=args.kl_mode, kl_kind="low_var_kl", kl_coef=1e-2),
            reward="vlm_post.rewards.MathReward",
            micro_batch_size=args.micro_batch_size,
            ppo_epochs=1,
            grad_clip=1.0,
        )
        instrument_rl(module, timer)
        dm = datamodule(args, data_path, args.rl_batch_size)
        clip = None  # RL steps the optimizer itself and clips with model.grad_clip
    module.bench_workarounds = []
    log(f"{stage}: strategy {strategy_name}, precision {args.precision}, {warmup} warm-up + {steps} timed steps")
    trainer = trainer_for(args, strategy_name, warmup + steps, [timer], clip)
    try:
        trainer.fit(module, datamodule=dm)
    except BaseException as exc:
        try:
            exc.bench_workarounds = list(module.bench_workarounds)  # kept in the attempt's record
        except Exception:  # noqa: BLE001 - some exception types take no attributes
            pass
        release(trainer, module)
        raise
    synchronize()
    total_s = time.perf_counter() - started
    figures = summarise(stage, timer, warmup, flops, module, args)
    figures.update(
        strategy=strategy_name,
        precision=args.precision,
        checkpointing=args.checkpointing,
        stage_total_s=total_s,
        setup_s=(timer.first_batch_at or time.perf_counter()) - started,
        buffer_dtypes=timer.buffer_dtypes,
        workarounds=sorted(set(module.bench_workarounds)),
        **memory_figures(),
    )
    if stage == "rl":
        figures["reference_model"] = bool(getattr(module, "bench_had_reference", False))
    del trainer, module, dm, timer
    return figures


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(stage: str, timer, warmup: int, flops: FlopModel, module, args) -> dict:
    timed = timer.steps[warmup:] or timer.steps  # all steps when there were no timed ones
    out: dict = {"steps_timed": len(timed), "steps_total": len(timer.steps), "per_step": []}
    for step in timer.steps:
        skip = ("seq_lens", "grids", "prompt_lens", "response_lens", "image_counts", "prefill_lens", "prefill_grids")
        out["per_step"].append({k: v for k, v in step.items() if k not in skip})
    step_s = mean([s["step_s"] for s in timed])
    if stage == "sft":
        tokens = mean([sum(s["seq_lens"]) for s in timed])
        step_flops = mean([3 * flops.forward(s["seq_lens"], s["head_tokens"], s["grids"]) for s in timed])
        out.update(
            rows=timed[0]["rows"],
            seq_len=timed[0]["width"],
            tokens_per_step=tokens,
            target_tokens_per_step=mean([s["head_tokens"] for s in timed]),
            image_tokens_per_step=mean([s["image_tokens"] for s in timed]),
            step_s=step_s,
            step_s_min=min(s["step_s"] for s in timed),
            tokens_per_s=tokens / step_s,
            target_tokens_per_s=mean([s["head_tokens"] for s in timed]) / step_s,
            tflop_per_step=step_flops / 1e12,
            achieved_tflops=step_flops / step_s / 1e12,
            mfu_989=step_flops / step_s / PEAK_FLOPS,
            mfu_790=step_flops / step_s / MEASURED_FLOPS,
            loss_first=timer.steps[0].get("loss"),
            loss_last=timer.steps[-1].get("loss"),
        )
        return out
    passes = 3 + (1 if module.loss_config.uses_reference else 0)
    prompts = timed[0]["rows"] // module.rollout.n
    try:
        single_update = module.single_update(module.ppo_epochs, prompts)
    except (AttributeError, TypeError):  # older RLModule
        single_update = module.ppo_epochs == 1 and module.mini_batch_size is None
    passes += 0 if single_update and module.loss_config.kl_mode != "reward" else 1  # old log-probs
    gen_s = mean([s["gen_s"] for s in timed])
    reward_s = mean([s["reward_s"] for s in timed])
    train_s = step_s - gen_s - reward_s
    gen_flops = mean([flops.generation(s["prefill_lens"], s["prefill_grids"], s["prompt_lens"], s["decode_steps"]) for s in timed])
    train_tokens = mean([sum(s["prompt_lens"]) + s["response_tokens"] for s in timed])
    train_flops = mean(
        [
            passes * flops.forward([p + r for p, r in zip(s["prompt_lens"], s["response_lens"])], s["response_tokens"], s["grids"])
            for s in timed
        ]
    )
    response_tokens = mean([s["response_tokens"] for s in timed])
    out.update(
        prompts=prompts,
        n=module.rollout.n,
        rows=timed[0]["rows"],
        prompt_len=mean([mean(s["prompt_lens"]) for s in timed]),
        decode_steps=mean([s["decode_steps"] for s in timed]),
        response_len_mean=response_tokens / timed[0]["rows"],
        finished_rows=mean([s["finished"] for s in timed]),
        shared_prefill=all(s.get("shared_prefill") for s in timed),
        forward_passes_per_training_token=passes,
        step_s=step_s,
        gen_s=gen_s,
        reward_s=reward_s,
        train_s=train_s,
        gen_fraction=gen_s / step_s,
        gen_tokens_per_s=response_tokens / gen_s,
        gen_ms_per_decode_step=1e3 * gen_s / max(1.0, mean([s["decode_steps"] for s in timed])),
        train_tokens_per_step=train_tokens,
        train_tokens_per_s=train_tokens / train_s,
        step_tokens_per_s=train_tokens / step_s,
        gen_tflop_per_step=gen_flops / 1e12,
        train_tflop_per_step=train_flops / 1e12,
        mfu_gen_989=gen_flops / gen_s / PEAK_FLOPS,
        mfu_train_989=train_flops / train_s / PEAK_FLOPS,
        mfu_train_790=train_flops / train_s / MEASURED_FLOPS,
        mfu_989=(gen_flops + train_flops) / step_s / PEAK_FLOPS,
        mfu_790=(gen_flops + train_flops) / step_s / MEASURED_FLOPS,
        reward_mean_last=timer.steps[-1].get("reward_mean"),
        kl_last=timer.steps[-1].get("kl"),
    )
    return out


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


def print_table(report: dict) -> None:
    rows = []
    sft, rl = report.get("sft", {}).get("result"), report.get("rl", {}).get("result")
    mem = lambda r: r.get("peak_allocated_gib", r.get("peak_rss_gib_process", float("nan")))  # noqa: E731
    if sft:
        rows.append(("sft step", sft["strategy"], sft["step_s"], sft["tokens_per_s"], sft["achieved_tflops"], sft["mfu_989"], sft["mfu_790"], mem(sft)))
    if rl:
        rows.append(("rl generate", rl["strategy"], rl["gen_s"], rl["gen_tokens_per_s"], rl["gen_tflop_per_step"] / rl["gen_s"], rl["mfu_gen_989"], rl["mfu_gen_989"] * PEAK_FLOPS / MEASURED_FLOPS, mem(rl)))
        rows.append(("rl train", rl["strategy"], rl["train_s"], rl["train_tokens_per_s"], rl["train_tflop_per_step"] / rl["train_s"], rl["mfu_train_989"], rl["mfu_train_790"], mem(rl)))
        rows.append(("rl step", rl["strategy"], rl["step_s"], rl["step_tokens_per_s"], (rl["gen_tflop_per_step"] + rl["train_tflop_per_step"]) / rl["step_s"], rl["mfu_989"], rl["mfu_790"], mem(rl)))
    header = ("stage", "strategy", "time s", "tokens/s", "TFLOP/s", "MFU@989", "MFU@790", "peak GiB")
    cells = [header] + [(r[0], r[1], f"{r[2]:.3f}", f"{r[3]:.0f}", f"{r[4]:.2f}", f"{r[5]:.3f}", f"{r[6]:.3f}", f"{r[7]:.1f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print("\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))) for c in cells), flush=True)
    if rl:
        print(
            f"rl: {rl['prompts']} prompts x n={rl['n']} = {rl['rows']} rows, prompt {rl['prompt_len']:.0f} tokens, "
            f"{rl['decode_steps']:.0f} decode steps ({rl['gen_ms_per_decode_step']:.1f} ms each incl. prefill), "
            f"prefill {'once per prompt' if rl['shared_prefill'] else 'per sample'}, "
            f"generation {100 * rl['gen_fraction']:.0f}% of the step, reward {rl['reward_s']:.3f}s",
            flush=True,
        )
    if sft:
        print(f"sft: {sft['rows']} rows x {sft['seq_len']} tokens ({sft['target_tokens_per_step']:.0f} target tokens per step)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--kl-mode", choices=["loss", "off"], default="loss", help="loss: with a frozen reference model")
    parser.add_argument("--precision", help="default bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--strategy", choices=["fsdp", "single"], help="first try; default fsdp on GPU, single on CPU")
    parser.add_argument("--rl-strategy", choices=["fsdp", "single"], help="first try for RL (default: --strategy)")
    parser.add_argument("--no-fallback", action="store_true", help="do not re-run a failed stage on a single device")
    parser.add_argument("--checkpointing", choices=["hf", "fsdp", "off"], default="hf",
                        help="activation checkpointing: the module's (HF layers), Lightning FSDP's, or none")
    parser.add_argument("--lightning-clip", action="store_true", help="under FSDP, clip through Lightning (raises)")
    parser.add_argument("--lightning-device", action="store_true",
                        help="under FSDP, keep Lightning's LightningModule.device (cpu) instead of fixing it")
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
    args.accelerator = "gpu" if (args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    args.strategy = args.strategy or ("fsdp" if args.accelerator == "gpu" else "single")
    args.rl_strategy = args.rl_strategy or args.strategy
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
    log(f"settings: size {args.size}, accelerator {args.accelerator}, precision {args.precision}, strategy {args.strategy}")
    save()

    model_dir = workdir / f"model-{args.size}"
    report["build"] = build_model_folder(args, model_dir, notes)
    ids = report["build"]["token_ids"]
    flops = FlopModel(args.size, report["build"]["params"])
    p = report["build"]["params"]
    log(
        f"parameters: total {p['total'] / 1e6:.1f}M, decoder (non-embedding) {p['decoder'] / 1e6:.1f}M, embedding "
        f"{p['embedding'] / 1e6:.1f}M (tied head), vision {(p['vision_patch_embed'] + p['vision_blocks'] + p['vision_merger']) / 1e6:.1f}M"
    )
    save()

    stages = [s for s in args.stages.split(",") if s]
    rows = max(64, args.batch_size * (args.warmup + args.steps) * 2, args.rl_batch_size * (args.rl_warmup + args.rl_steps) * 2)
    data_path = write_data(args, workdir / "data", rows)
    prompt_tokens, full_tokens = prompt_length(args, model_dir, data_path)
    if prompt_tokens + 8 > args.seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} leaves no room for a target after the {prompt_tokens}-token prompt")
    if full_tokens < args.seq_len:
        raise SystemExit(f"the synthetic target is too short: {full_tokens} tokens < --seq-len {args.seq_len}")
    extra = {"max_target_tokens": args.seq_len - prompt_tokens}
    report["data"] = {"rows": rows, "prompt_tokens": prompt_tokens, "sft_target_tokens": extra["max_target_tokens"], "path": str(data_path)}
    log(f"data: {rows} rows, prompt {prompt_tokens} tokens (image {args.image_size}x{args.image_size}), SFT target {extra['max_target_tokens']} tokens")
    save()

    for stage in stages:
        first = args.strategy if stage == "sft" else args.rl_strategy
        injected = stage in os.environ.get("GPU_STEP_FAIL_FIRST", "").split(",")  # test hook: fail, then fall back
        attempts = [first] + ([] if args.no_fallback or (first == "single" and not injected) else ["single"])
        report[stage] = {"attempts": []}
        for strategy_name in attempts:
            elapsed = time.perf_counter() - T0
            if elapsed > args.budget_s:
                notes.append(f"{stage}/{strategy_name} not started: {elapsed:.0f}s elapsed > budget {args.budget_s:.0f}s")
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
                attempt["workarounds"] = sorted(set(getattr(exc, "bench_workarounds", [])))
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
