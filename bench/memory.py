"""Peak memory of one training step of SFTModule, RLModule and DistillModule, against a naive full-logits head.

Setting: two model sizes, random weights, fp32, one CPU thread, Lightning's CPU trainer:
  - ``tiny``: ``vlm_post.models.tiny.build_tiny_qwen2_5_vl`` (hidden 128, 2 layers, its own ~500-token
    vocabulary); OPD's teacher is the same builder at seed 1, hidden 256, 3 layers (as bench/opd_step.py);
  - ``151k``: the same Qwen2.5-VL structure with the REAL vocabulary size, 151,936 rows, at reduced depth:
    hidden 512, 2 decoder layers, vision depth 2, tied embeddings (as Qwen2.5-VL-3B); the teacher is hidden
    768, 2 layers. The tokenizer stays the tiny one (token ids < 500, so prompts and samples tokenise as in
    the tiny size); only the embedding, the output head and the sampled distribution have 151,936 entries.
Data: the demo prompts (vlm_post.data.synthetic, 112x112 images: 16 image tokens, prompts of about 74
tokens), with bench/_gpu_data.py's long ``solution`` column as the SFT target, every SFT row cut to exactly
``--seq-len`` tokens.

One step:
  - SFT: ``--sft-rows`` rows of ``--seq-len`` tokens, forward + backward + AdamW step;
  - RL (GRPO, MathReward, KL as a loss term against the frozen reference, one update per rollout batch):
    ``--prompts`` x ``--n`` samples of ``--max-new-tokens`` tokens, the reference's log-probs, then the
    policy's forward + backward (all rows in one micro-batch) + AdamW step;
  - OPD (``loss.kind: topk``, teacher top-k 32, in-process teacher, no cache): the same sampling, the teacher's
    scores, then the student's forward + backward + AdamW step.
``vlm_post`` is the modules as they are: log-probs, entropy, top-k scores and the top-k KL come from hidden
states in vocabulary chunks (``logprob_chunk_size`` 1024 tokens), and each prompt runs once for its n rows.
``naive`` (bench/_memory_naive.py) swaps only that head for what a straightforward implementation does:
``model(**inputs).logits`` ([rows, T, V] fp32, every row with its own prompt and image), ``log_softmax`` over
the vocabulary and a gather (entropy, a logged metric, from the same log-softmax under no_grad; the teacher's
top-k likewise). Sampling is vlm_post's HF ``generate`` engine on both sides (it never holds [T, V] logits).

Memory: each (size, module, method) runs in a fresh subprocess: load, one warm-up step (it also allocates the
optimizer state), then one measured step. Just before it, after gc and malloc_trim, the resident set is read
(VmRSS) and the peak is reset by writing "5" to /proc/self/clear_refs; after it the peak is VmHWM. Reported:
peak GiB = VmHWM - VmRSS before, i.e. everything the step allocates beyond the weights, their gradients and the
optimizer state (which ``base`` shows); time = that step's wall time. Where clear_refs cannot reset VmHWM the
peak falls back to ru_maxrss (the process's whole life, warm-up included) and the output says so. Torch's CPU
allocator returns large blocks to the OS when freed, so resident memory tracks live tensors.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py      (about 5.5 minutes; --sizes tiny: about a minute)
The last line reads `sft_peak_ratio=<x> rl_peak_ratio=<y> opd_peak_ratio=<z>`, vlm_post over naive at 151k.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

QWEN_VOCAB = 151_936
SIZES = {
    "tiny": {"student": {"hidden_size": 128, "num_layers": 2}, "teacher": {"hidden_size": 256, "num_layers": 3}},
    "151k": {"student": {"hidden_size": 512, "num_layers": 2}, "teacher": {"hidden_size": 768, "num_layers": 2}},
}
MODULES = ("sft", "rl", "opd")
METHODS = ("vlm_post", "naive")
TOP_K = 32
LR = 1e-5


# --- the models and the data (built once, in the parent) ------------------------------------------------


def build_model(out: Path, seed: int, hidden_size: int, num_layers: int, vocab_size: int | None) -> Path:
    """The tiny builder's folder; with ``vocab_size`` its weights are re-drawn with that many (tied) rows."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    build_tiny_qwen2_5_vl(out, seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    if vocab_size is None:
        return out
    config = AutoConfig.from_pretrained(out)
    config.text_config.vocab_size = vocab_size
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = model.generation_config.from_pretrained(out)
    model.save_pretrained(out)
    return out


def prepare(args: argparse.Namespace, work: Path) -> None:
    import _gpu_data

    for size in args.sizes:
        vocab = QWEN_VOCAB if size == "151k" else None
        for role, seed in (("student", 0), ("teacher", 1)):
            if not (work / size / role / "config.json").is_file():
                build_model(work / size / role, seed, **SIZES[size][role], vocab_size=vocab)
    if not (work / "data" / "train_long.parquet").is_file():
        _gpu_data.write_data(args, work / "data", rows=64)


# --- one variant (in its own process) -------------------------------------------------------------------


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return status_bytes("VmHWM") <= status_bytes("VmRSS") + (16 << 20)


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def step_probe(step: int):
    from lightning.pytorch import Callback

    class StepMemory(Callback):
        """Peak resident memory and wall time of training step ``step`` (a Lightning training batch)."""

        def __init__(self) -> None:
            self.result: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx != step:
                return
            if "sft" in batch:
                self.result["tokens"] = int(batch["sft"]["attention_mask"].sum())
            release_free_memory()
            self.result["rss_before"] = status_bytes("VmRSS")
            self.result["peak_source"] = "VmHWM" if reset_peak() else "ru_maxrss"
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx != step:
                return
            self.result["time_s"] = time.perf_counter() - self.started
            if self.result["peak_source"] == "VmHWM":
                peak = status_bytes("VmHWM")
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            self.result["peak_bytes"] = peak - self.result["rss_before"]
            length = trainer.callback_metrics.get("train/response_length")
            if length is not None:  # RL / OPD: prompt rows x (prompt width + mean response length)
                self.result["response_tokens"] = round(float(length) * pl_module.rollout.n * len(batch["examples"]))

    return StepMemory()


def build_module(args: argparse.Namespace, work: Path, size: str, module: str, method: str):
    from _memory_naive import NAIVE

    from vlm_post.losses import GRPOLossConfig
    from vlm_post.modules import (
        DistillLossConfig,
        DistillModule,
        EvalConfig,
        OptimConfig,
        RLModule,
        SFTModule,
        TeacherConfig,
    )
    from vlm_post.rollout import SamplingParams

    classes = {"sft": SFTModule, "rl": RLModule, "opd": DistillModule}
    cls = NAIVE[module] if method == "naive" else classes[module]
    common = {"optim": OptimConfig(lr=LR, schedule="constant"), "eval": EvalConfig(n=0, max_new_tokens=8)}
    if module == "sft":
        return cls(str(work / size / "student"), **common)
    on_policy = {
        "rollout": SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens),
        "micro_batch_size": args.prompts * args.n,  # all rows in one forward/backward
        "grad_clip": 1.0,
        **common,
    }
    if module == "rl":
        loss = GRPOLossConfig(kl_mode="loss", aggregation="token-mean")
        return cls(str(work / size / "student"), loss=loss, reward="vlm_post.rewards.MathReward", **on_policy)
    teacher = TeacherConfig(model_name_or_path=str(work / size / "teacher"), top_k=TOP_K)
    return cls(str(work / size / "student"), teacher=teacher, loss=DistillLossConfig(kind="topk"), **on_policy)


def measure(args: argparse.Namespace, work: Path, size: str, module: str, method: str) -> dict:
    """One warm-up step, then the measured one, in this (fresh) process."""
    import _gpu_data
    import lightning as L

    L.seed_everything(args.seed, verbose=False)
    model = build_module(args, work, size, module, method)
    path = work / "data" / "train_long.parquet"
    if module == "sft":
        prompt_tokens, _ = _gpu_data.prompt_length(args, work / size / "student", path)
        data = _gpu_data.datamodule(args, path, args.sft_rows, max_target_tokens=args.seq_len - prompt_tokens)
    else:
        data = _gpu_data.datamodule(args, path, args.prompts)
    probe = step_probe(step=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=2,
        logger=False,
        log_every_n_steps=1,  # the measured step logs (and computes) its metrics, response length included
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[probe],
    )
    trainer.fit(model, data)
    return probe.result


# --- the parent ------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, work: Path, size: str, module: str, method: str) -> dict:
    command = [sys.executable, __file__, "--child", size, module, method, "--work-dir", str(work)]
    command += [f"--seq-len={args.seq_len}", f"--sft-rows={args.sft_rows}", f"--prompts={args.prompts}"]
    command += [f"--n={args.n}", f"--max-new-tokens={args.max_new_tokens}", f"--seed={args.seed}"]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        sys.exit(f"{size} {module} {method} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def tokens_label(module: str, ours: dict, naive: dict, args: argparse.Namespace) -> str:
    """The measured step's work: SFT tokens, or RL/OPD rows and response tokens (naive's too when they differ)."""
    key = "tokens" if module == "sft" else "response_tokens"
    counts = f"{ours.get(key, 0)}" + (f"/{naive.get(key, 0)}" if naive.get(key) != ours.get(key) else "")
    return f"{counts} tok" if module == "sft" else f"{args.prompts}x{args.n} rows, {counts} resp tok"


def print_table(args: argparse.Namespace, figures: dict) -> None:
    header = f"{'size':5s} {'module':6s} {'step':28s} {'base GiB':>8s}"
    header += "".join(f" {m + ' peak GiB':>17s} {m + ' s':>11s}" for m in METHODS) + f" {'peak ratio':>10s}"
    print(header)
    for size in args.sizes:
        for module in args.modules:
            ours, naive = figures[size, module, "vlm_post"], figures[size, module, "naive"]
            line = (
                f"{size:5s} {module:6s} {tokens_label(module, ours, naive, args):28s} {ours['rss_before'] / 2**30:8.2f}"
            )
            for result in (ours, naive):
                line += f" {result['peak_bytes'] / 2**30:17.3f} {result['time_s']:11.2f}"
            print(line + f" {ours['peak_bytes'] / naive['peak_bytes']:10.3f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,151k", help="comma-separated, of: " + ", ".join(SIZES))
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated, of: " + ", ".join(MODULES))
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per SFT row")
    parser.add_argument("--sft-rows", type=int, default=4, help="SFT rows per step")
    parser.add_argument("--prompts", type=int, default=2, help="RL/OPD prompts per step")
    parser.add_argument("--n", type=int, default=4, help="RL/OPD samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="keep the models and data here (default: a temporary directory)")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "MODULE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sizes, args.modules = args.sizes.split(","), args.modules.split(",")
    args.image_size = 112  # bench/_gpu_data.py's pixels: 112 x 112 -> 16 image tokens
    unknown = sorted(set(args.sizes) - set(SIZES)) + sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown size or module: {', '.join(unknown)}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args, Path(args.work_dir), *args.child)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        prepare(args, work)
        print(
            f"setting: fp32, torch threads={torch.get_num_threads()}; SFT {args.sft_rows} x {args.seq_len} tokens; "
            f"RL/OPD {args.prompts} prompts x n={args.n}, <= {args.max_new_tokens} new tokens, one micro-batch; "
            f"OPD top-k {TOP_K}; 151k: hidden 512 / teacher 768, 2 layers, V={QWEN_VOCAB}, tiny tokenizer"
        )
        figures = {}
        for size in args.sizes:
            for module in args.modules:
                for method in METHODS:
                    figures[size, module, method] = run_child(args, work, size, module, method)
    sources = {result["peak_source"] for result in figures.values()}
    print(
        "memory: peak RSS increase over the RSS before the measured step (after a warm-up step), "
        f"from {'/'.join(sorted(sources))}; base = RSS before the step; one fresh process per variant"
    )
    if "ru_maxrss" in sources:
        print("note: /proc/self/clear_refs did not reset VmHWM; ru_maxrss covers loading and the warm-up step too")
    print_table(args, figures)
    print(f"total {time.perf_counter() - started:.0f} s")
    if "151k" in args.sizes:
        ratios = [
            f"{module}_peak_ratio="
            f"{figures['151k', module, 'vlm_post']['peak_bytes'] / figures['151k', module, 'naive']['peak_bytes']:.3f}"
            for module in args.modules
        ]
        print(" ".join(ratios))


if __name__ == "__main__":
    main()
