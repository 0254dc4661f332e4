"""On-policy distillation (OPD) step throughput: vlm_post's DistillModule against TRL's DistillationTrainer.

Setting (both sides identical unless said): student = the tiny random-init Qwen2.5-VL of
``vlm_post.models.tiny.build_tiny_qwen2_5_vl`` (seed 0, hidden 128, 2 layers); teacher = the same
builder at seed 1, hidden 256, 3 layers (same tokenizer and image processor); both built offline
into a temporary folder, fp32, sdpa attention. Prompts: the synthetic demo data
(``vlm_post.data.synthetic.write_demo_dataset``, one 112x112 image each, min_pixels = max_pixels =
12544 as in configs/demo/opd.yaml), in the same order on both sides (our sampler's order, fed to TRL
unshuffled), rendered to the same prompt text (checked). Per step: ``--prompts`` prompts, ``--n``
samples per prompt, at most ``--max-new-tokens`` new tokens, temperature 1.0 (no top-k / top-p),
the same vision special tokens suppressed and the same stop tokens. Fully on-policy: every step
samples from the current student, the teacher scores those samples, then exactly one optimizer
step over all rows (one forward/backward, no gradient accumulation, no gradient checkpointing -
TRL's default is on), AdamW (torch's) at lr 1e-3, constant, no weight decay, gradient clipping at
1.0. No logging, checkpointing, validation or teacher cache on either side.

The objectives are both the per-token reverse KL(student || teacher) on the student's samples,
computed the way each library does it:
- ours: ``DistillModule`` with ``loss.kind: topk`` (the exact KL of the teacher's top-``--top-k``
  (32) ids plus a tail bucket), ``teacher.top_k`` = 32, the teacher scoring in-process in a
  separate no-grad pass before the update;
- TRL 1.16: ``DistillationTrainer`` with ``beta=1.0``, which its DistillationConfig documents as the
  reverse KL end of the generalized JSD ("0.0 = forward KL, 0.5 = JSD, 1.0 = reverse KL"), over the
  full vocabulary (chunked), the teacher's backbone running inside the loss under no_grad;
  ``use_vllm=False`` (``model.generate``). TRL's trainer is always on-policy (it generates every
  step; there is no ``lmbda`` / off-policy fraction in 1.16) and samples exactly one completion
  per prompt (its sampler repeats nothing: "Distillation is n=1"). With ``--n`` > 1 each prompt is
  put n times in a row into TRL's dataset (the only way to get n samples of a prompt from it); ours
  samples n per prompt from one shared prefill. The defaults are configs/demo/opd.yaml's shape
  (16 prompts x n = 2, at most 12 new tokens); ``--prompts 8 --n 1 --max-new-tokens 32`` is the
  case where both sides run exactly the same Hugging Face forwards (bench/README.md has both).

Each side runs in its own subprocess (``--side ours`` / ``--side trl``) so TRL is never imported
next to vlm_post's training code; ``--rounds`` runs alternate the sides (a busy spell on a shared
machine hits both) and their timed steps are pooled. Each run starts with ``--warmup`` untimed
steps. One CPU thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)).

Definitions:
- step time: wall time from the end of one optimizer step to the end of the next, i.e. everything
  a step costs, data loading and the processor call included.
- tokens/s (the headline measure, and the ratio): tokens processed per step (mean over the timed
  steps) / the median step time (wall), where tokens = the prompt tokens of all B*n rows
  (non-padding, image placeholder tokens included) + the response tokens actually generated (up to
  and including the stop token). These are the tokens both the student and the teacher run over.
  Ours counts from the prompt attention mask and the rollout's response mask, TRL from its own
  prompt ids and completion ids (its ``_generate``). The median keeps bursts of other load on a
  shared machine out of the figure; the mean-step figure (all tokens / all time) is shown too, as
  is generated tokens/s alone.
- breakdown per step, from the same hooks on both sides: ``preprocess`` is the processor's
  ``__call__`` (chat template, tokenization, image patches; ours once in the collator, TRL once
  to tokenize for generation and once more to build the forward's pixel inputs); ``generate`` is
  the rollout (ours: the engine's call; TRL: ``model.generate``), with the student's vision
  encoder and decoder forwards inside it; ``teacher`` is the teacher's base-model forward (its
  vision encoder also shown) plus, on ours, the top-k extraction from its hidden states (``teacher
  head``: ``HFTeacher.score`` less the teacher's forward; TRL
  projects the teacher's hidden states onto the vocabulary inside its loss function, so that
  part of its teacher cost is in ``loss``); ``student forward`` is the student's base-model
  forward over prompt + response (vision encoder included, also shown); ``loss`` is the chunked
  divergence from hidden states (ours: ``DistillModule.micro_loss``, the chunked pass at the teacher's
  top-k ids and the coarsened KL, less the student forward inside it; TRL: ``_chunked_divergence_loss``), forward only; ``backward``; ``optimizer`` (the AdamW step);
  ``other`` = the rest (data loading, padding and masks, metrics such as our accuracy grading,
  gradient clipping, framework).
- every figure is shown from wall time and from the process's CPU time; on an idle machine they
  agree, on a busy one the CPU figures move less.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/opd_step.py [--steps 6 --rounds 3 --prompts 16 --n 2 --max-new-tokens 12]
About 1.5 minutes with the defaults. Needs the bench extra (pip install -c requirements/lock.txt
-e '.[bench]'). ``--profile`` adds a torch.profiler table of one step per side. The last line reads
``ratio=<x>``: ours over TRL's tokens/s (wall time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _against_trl as harness  # what this script shares with the other comparison against TRL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

LR = 1e-3  # configs/demo/opd.yaml
PIXELS = 12544  # configs/demo/opd.yaml: min_pixels = max_pixels = 112 * 112
TEACHER = {"seed": 1, "hidden_size": 256, "num_layers": 3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the timed ones")
    # Defaults: configs/demo/opd.yaml's shape.
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt (TRL's trainer samples 1; see above)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=32, help="ours: teacher log-probs kept per position")
    parser.add_argument("--seed", type=int, default=0)
    harness.add_side_options(
        parser, work_dir_help="where the tiny models and demo data go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.n < 1:
        parser.error("--warmup, --steps, --rounds and --n must be at least 1 (steps are timed end to end)")
    return args


# --- one side ----------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    import lightning as L

    from vlm_post.modules import DistillLossConfig, DistillModule, EvalConfig, OptimConfig, TeacherConfig
    from vlm_post.rollout import SamplingParams
    from vlm_post.teacher.scoring import HFTeacher

    L.seed_everything(args.seed, verbose=False)
    probe = harness.Probe()
    profiler = harness.StepProfiler(args.profile, args.warmup + args.steps - 1, rows=25)

    class TimedTeacher(HFTeacher):
        def score(self, rows):
            # teacher: the whole call; teacher_head: its top-k log-probs from the last hidden states (less the forward)
            return probe.timed("teacher", probe.timed_outside("teacher_head", super().score, "teacher_model"))(rows)

    class TimedDistill(DistillModule):
        """DistillModule with its engine, teacher and top-k loss timed: subclasses, nothing patched."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.engine = probe.timed_engine(type(self.engine))(self.processor)
            config = self.teacher_config
            self.teacher = TimedTeacher(config.model_name_or_path, self.processor, config.top_k, config.dtype,
                                        self.attn_implementation)  # fmt: skip

        def micro_loss(self, *args, **kwargs):
            # the loss: the student's chunked pass at the teacher's top-k ids, with its entropy, and the coarsened KL
            # after it, a few elementwise ops over (tokens, k) (the call less its forward)
            return probe.timed_outside("loss", super().micro_loss, "model_train")(*args, **kwargs)

    module = TimedDistill(
        str(work / "student"),
        teacher=TeacherConfig(model_name_or_path=str(work / "teacher"), top_k=args.top_k),
        loss=DistillLossConfig(kind="topk", aggregation="token-mean"),
        rollout=SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens),
        optim=OptimConfig(lr=LR, schedule="constant"),
        eval=EvalConfig(n=0, greedy=True, max_new_tokens=args.max_new_tokens),
        epochs=1,
        micro_batch_size=args.prompts * args.n,  # all rows in one forward/backward, as TRL
        grad_clip=1.0,
    )
    module.configure_model()
    module.teacher.load("cpu")  # on_fit_start loads it again as a no-op
    probe.install(module.policy, module.teacher.model, type(module.processor))
    return harness.fit_ours(module, args, work / "demo-data" / "train.parquet", PIXELS, probe, profiler)


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import datasets
    import trl.trainer.distillation_trainer as trl_distill
    from transformers import AutoProcessor
    from trl import DistillationConfig, DistillationTrainer

    from vlm_post.rollout.hf import HFGenerateEngine

    probe = harness.Probe()
    profiler = harness.StepProfiler(args.profile, args.warmup + args.steps - 1, rows=25)
    processor = AutoProcessor.from_pretrained(str(work / "student"))
    examples, messages = harness.trl_examples(processor, args, work / "demo-data" / "train.parquet", PIXELS)
    rows = [e for e in examples for _ in range(args.n)]  # n > 1: each prompt n times in a row
    dataset = datasets.Dataset.from_dict({"prompt": [messages(e) for e in rows], "images": [e.images for e in rows]})
    model, teacher = harness.load_trl_model(work / "student"), harness.load_trl_model(work / "teacher")
    engine = HFGenerateEngine(processor)
    # The same stop tokens as vlm_post's engine: TRL ends completions at the tokenizer's eos and every eos
    # id in the model's generation config.
    model.generation_config.eos_token_id = list(engine.stop_ids)
    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-opd-bench-"),
        **harness.trl_config(args, LR, engine.banned),  # the same suppressed tokens as our engine
        beta=1.0,  # reverse KL
    )
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=processor
    )
    probe.install(trainer.model, trainer.teacher_model, type(processor))
    trainer.model.generate = probe.timed_generation(trainer.model.generate)
    # Looked up by name at call time in TRL's module: the chunked divergence (student and teacher heads).
    trl_distill._chunked_divergence_loss = probe.timed("loss", trl_distill._chunked_divergence_loss)
    trl_generate = trainer._generate

    def counting_generate(prompts):
        out = trl_generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        probe.tokens = (sum(len(ids) for ids in prompt_ids), sum(len(ids) for ids in completion_ids))
        return out

    trainer._generate = counting_generate
    return harness.train_trl(trainer, probe, profiler)


# --- the report ------------------------------------------------------------------------------------

PARTS = ("preprocess", "generate", "teacher_all", "train_fwd", "loss", "backward", "optim")  # the rest: "other"


def summarize_steps(steps: list[dict], skip: int) -> dict:
    """Means over the timed steps, wall and CPU (``<key>_cpu``); the headline tokens/s is mean tokens per step over
    the median step time (robust to bursts of other load), ``mean_tokens_per_s`` all tokens / all time."""
    out = harness.summarize(steps, skip, rate_over="median")
    for clock in harness.CLOCKS:
        get = harness.figures(out, clock)
        # ours: the teacher's score() call holds its forward and its top-k head; TRL: only the teacher's
        # base-model forward is apart from the loss
        out["teacher_all" + clock] = get("teacher") if "teacher" in out else get("teacher_model")
        out["train_fwd" + clock] = get("model_train")
    return harness.add_other(out, PARTS)


# (label, key, has a CPU-time figure)
ROWS = [
    ("step time, median (s)", "median_step", True),
    ("step time, mean (s)", "step", True),
    ("  preprocess (processor) (s)", "preprocess", True),
    ("  generate (s)", "generate", True),
    ("    vision encoder (s)", "vision_gen", True),
    ("    decoder forwards (s)", "decoder_gen", True),
    ("  teacher (s)", "teacher_all", True),
    ("    forward (s)", "teacher_model", True),
    ("      vision encoder (s)", "teacher_vision", True),
    ("    top-k head (s)", "teacher_head", True),
    ("  student forward (s)", "train_fwd", True),
    ("    vision encoder (s)", "vision_train", True),
    ("  loss, forward (s)", "loss", True),
    ("  backward (s)", "backward", True),
    ("  optimizer (s)", "optim", True),
    ("  other (s)", "other", True),
    ("prompt tokens / step", "prompt_tokens", False),
    ("generated tokens / step", "generated_tokens", False),
    ("generated tokens / s", "generated_per_s", True),
    ("tokens / s, mean step", "mean_tokens_per_s", True),
    ("tokens / s (prompt + generated)", "tokens_per_s", True),
]


def main() -> None:
    args = parse_args()
    if args.side:
        harness.run_side(args, {"ours": run_ours, "trl": run_trl})
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        if not all((work / name).exists() for name in ("student", "teacher", "demo-data")):
            from vlm_post.data.synthetic import write_demo_dataset
            from vlm_post.models.tiny import build_tiny_qwen2_5_vl

            build_tiny_qwen2_5_vl(work / "student", seed=0)
            build_tiny_qwen2_5_vl(work / "teacher", **TEACHER)
            train = max(64, args.prompts * (args.warmup + args.steps))
            write_demo_dataset(work / "demo-data", train=train, validation=8, test=8)
        flags = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--prompts={args.prompts}"]
        flags += [f"--n={args.n}", f"--max-new-tokens={args.max_new_tokens}", f"--top-k={args.top_k}"]
        flags += [f"--seed={args.seed}"]
        comparison = harness.compare(__file__, args, work, flags, summarize_steps)
    results = comparison.results
    print(
        f"OPD step, tiny Qwen2.5-VL student (128 x 2) <- teacher (256 x 3), {args.prompts} prompts x n={args.n}, "
        f"max {args.max_new_tokens} new tokens, one thread; mean of {args.rounds} x {args.steps} steps "
        f"(each run after {args.warmup} warm-up steps)"
    )
    print(harness.table(results, ROWS, one_decimal=lambda key: "tokens" in key or key.endswith("per_s")))
    harness.print_times(comparison, time.perf_counter() - started)
    if "ours" in results and "trl" in results:
        ours, theirs = results["ours"], results["trl"]
        per_round = comparison.per_round
        rounds = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(per_round["ours"], per_round["trl"])]
        print("ratio per round (wall, median step): " + " ".join(f"{r:.3f}" for r in rounds))
        print(
            f"mean-step ratio={ours['mean_tokens_per_s'] / theirs['mean_tokens_per_s']:.3f} "
            f"CPU-time ratio={ours['tokens_per_s_cpu'] / theirs['tokens_per_s_cpu']:.3f} "
            f"(mean-step {ours['mean_tokens_per_s_cpu'] / theirs['mean_tokens_per_s_cpu']:.3f})"
        )
        print(f"ratio={ours['tokens_per_s'] / theirs['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
