"""GRPO step throughput: vlm_post's RLModule against TRL's GRPOTrainer, side by side.

Setting (both sides identical): the tiny random-init Qwen2.5-VL of tools/make_tiny_model.py
(seed 0, built offline into a temporary folder), the synthetic demo prompts of
tools/make_demo_data.py (one 112x112 image each, min_pixels = max_pixels = 12544 as in
configs/demo/rl.yaml), ``--prompts`` prompts per step, ``--n`` samples per prompt, at most
``--max-new-tokens`` new tokens, temperature 1.0 (no top-k / top-p), the same vision special
tokens suppressed, the same reward (vlm_post.rewards.MathReward, wrapped as a TRL reward
function), beta = 0 (no KL, no reference model), token-mean loss with clip 0.2 / 0.28, one
optimizer step per rollout batch (all B*n rows in one forward/backward, so neither side runs
a separate old-log-prob pass), AdamW (torch's, not fused) at lr 3e-4, constant schedule,
gradient clipping at 1.0, fp32, no gradient checkpointing (TRL's default is on), one CPU
thread. TRL runs with use_vllm=False (``model.generate``) and no logging, saving or
evaluation. The prompts come in the same order on both sides (our sampler's order, fed to TRL
unshuffled), and the tool checks that both sides render the same prompt text.

Each side runs in its own subprocess (``--side ours`` / ``--side trl``), so TRL is never
imported next to vlm_post's training code; ``--rounds`` runs alternate the sides, so that a
busy spell on a shared machine hits both, and their timed steps are pooled. Each run starts
with ``--warmup`` untimed steps.

Definitions:
- step time: wall time from the end of one optimizer step to the end of the next, i.e.
  everything a step costs, data loading and collation (the processor call) included;
- tokens/s: tokens processed per step / step time, where tokens = the prompt tokens of all
  B*n rows (non-padding, image placeholder tokens included) + the response tokens actually
  generated (up to and including the stop token). Both sides count the same way: ours from
  the prompt's attention mask and the rollout's response mask, TRL's from its own prompt and
  completion lengths (``num_input_tokens_seen``). Generated tokens/s alone is shown as well.
- breakdown, per step, from the same hooks on both models: ``generate`` is the rollout (ours:
  the engine's call, shared prefill included; TRL: ``model.generate``, its prompt
  tokenization counts as other); inside it, ``vision`` is the vision encoder and ``decoder``
  the language model's forward calls (prefill + one per new token). Outside generation:
  ``train forward`` is the base model's forward over prompt + response (vision encoder
  included, also shown alone), ``head`` the log-probs and entropy from the last hidden states
  (ours: ``micro_loss`` less the forward inside it, i.e. the chunked pass and the GRPO loss's few
  elementwise ops over (rows, tokens); TRL: the rest of
  its top-level forward: lm_head, log-softmax, entropy), ``backward``, ``optimizer`` (the AdamW step), ``reward``, and ``other`` = the rest
  (data loading, prompt processing, padding and masks, advantages, loss, clipping, framework).
- every figure is shown from wall time and from the process's CPU time; on an idle machine
  they agree, on a busy one the CPU figures move less.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/rl_step.py [--steps 6 --prompts 8 --n 8 --max-new-tokens 32]
About 2.5-3 minutes with the defaults. Needs the bench extra (pip install -c requirements/lock.txt
-e '.[bench]'). ``--profile`` adds a torch.profiler table of one step per side. The last line
reads ``ratio=<x>``: ours over TRL's tokens/s (wall time).
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

LR = 3e-4
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
PIXELS = 12544  # configs/demo/rl.yaml: min_pixels = max_pixels = 112 * 112


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the timed ones")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (the rollout batch)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (the GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    harness.add_side_options(
        parser, work_dir_help="where the tiny model and demo data go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error(
            "--warmup, --steps and --rounds must be at least 1 (a step is timed from the end of the one before)"
        )
    return args


# --- one side ----------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    import lightning as L

    from vlm_post.losses import GRPOLossConfig
    from vlm_post.modules import EvalConfig, OptimConfig, RLModule
    from vlm_post.rewards import MathReward
    from vlm_post.rollout import SamplingParams

    L.seed_everything(args.seed, verbose=False)
    probe = harness.Probe()
    profiler = harness.StepProfiler(args.profile, args.warmup + args.steps - 1)

    class TimedReward(MathReward):
        def __call__(self, responses, examples):
            return probe.timed("reward", super().__call__)(responses, examples)

    class TimedRL(RLModule):
        """RLModule with its engine, reward and log-prob head timed: subclasses, nothing patched."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.engine = probe.timed_engine(type(self.engine))(self.processor)

        def micro_loss(self, *args, **kwargs):
            # the head: the chunked log-prob/entropy pass over the last hidden states and the GRPO loss after it
            # (the call less its forward)
            return probe.timed_outside("head", super().micro_loss, "model_train")(*args, **kwargs)

    module = TimedRL(
        str(work / "tiny-qwen2.5-vl"),
        optim=OptimConfig(lr=LR, schedule="constant"),
        eval=EvalConfig(n=0, greedy=True, max_new_tokens=args.max_new_tokens),
        rollout=SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens),
        loss=GRPOLossConfig(
            clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, aggregation="token-mean", kl_mode="off"
        ),
        reward=TimedReward(),
        micro_batch_size=args.prompts * args.n,
        epochs=1,
        grad_clip=1.0,
    )
    module.configure_model()
    probe.install(module.policy)
    return harness.fit_ours(module, args, work / "demo-data" / "train.parquet", PIXELS, probe, profiler)


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import datasets
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from vlm_post.rewards import MathReward
    from vlm_post.rollout.hf import HFGenerateEngine

    probe = harness.Probe()
    profiler = harness.StepProfiler(args.profile, args.warmup + args.steps - 1)
    model_dir = work / "tiny-qwen2.5-vl"
    processor = AutoProcessor.from_pretrained(str(model_dir))
    examples, messages = harness.trl_examples(processor, args, work / "demo-data" / "train.parquet", PIXELS)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [messages(e) for e in examples],
            "images": [e.images for e in examples],
            "row": list(range(len(examples))),
        }
    )
    math_reward = MathReward()
    counted = {"seen": 0, "generated": 0}  # TRL's num_input_tokens_seen so far; this step's generated tokens

    def math_reward_fn(prompts, completions, completion_ids, row, **kwargs) -> list[float]:
        start = probe.now()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = math_reward(texts, [examples[i] for i in row]).reward
        probe.add("reward", start)
        counted["generated"] = sum(len(ids) for ids in completion_ids)
        return out

    def count_tokens(state) -> tuple[int, int]:
        processed = state.num_input_tokens_seen - counted["seen"]  # TRL's prompt + completion lengths
        counted["seen"] = state.num_input_tokens_seen
        return processed - counted["generated"], counted["generated"]

    banned = HFGenerateEngine(processor).banned  # the same suppressed tokens as our engine
    config = GRPOConfig(
        output_dir=str(work / "trl-output"),  # nothing is saved
        **harness.trl_config(args, LR, banned),
        num_generations=args.n,
        beta=0.0,
        num_iterations=1,
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        loss_type="dapo",  # token-mean over the batch
        scale_rewards="group",
    )
    trainer = GRPOTrainer(
        model=harness.load_trl_model(model_dir),
        reward_funcs=math_reward_fn,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
    )
    probe.install(trainer.model)
    trainer.model.generate = probe.timed_generation(trainer.model.generate)
    # TRL's head: everything the top-level forward does after the base model (lm_head, log-softmax, entropy).
    probe.hook(trainer.model, "top", split_generation=True)
    return harness.train_trl(trainer, probe, profiler, count_tokens)


# --- the report ------------------------------------------------------------------------------------

PARTS = ("generate", "train_fwd", "head", "backward", "optim", "reward")  # the rest of the step is "other"


def summarize_steps(steps: list[dict], skip: int) -> dict:
    """Means over the timed steps, wall and CPU (``<key>_cpu``) figures; tokens/s = all tokens / all time."""
    out = harness.summarize(steps, skip)
    for clock in harness.CLOCKS:
        get = harness.figures(out, clock)
        # TRL's base-model forward runs inside its top-level forward; its head is the difference.
        if "top_train" in out:
            out["head" + clock] = get("top_train") - get("model_train")
        out["train_fwd" + clock] = get("model_train")
    return harness.add_other(out, PARTS)


# (label, key, has a CPU-time figure)
ROWS = [
    ("step time (s)", "step", True),
    ("  in the step hooks (s)", "in_step", False),
    ("  generate (s)", "generate", True),
    ("    vision encoder (s)", "vision_gen", True),
    ("    decoder forwards (s)", "decoder_gen", True),
    ("  train forward (s)", "train_fwd", True),
    ("    vision encoder (s)", "vision_train", True),
    ("  log-prob head (s)", "head", True),
    ("  backward (s)", "backward", True),
    ("  optimizer (s)", "optim", True),
    ("  reward (s)", "reward", True),
    ("  other (s)", "other", True),
    ("prompt tokens / step", "prompt_tokens", False),
    ("generated tokens / step", "generated_tokens", False),
    ("generated tokens / s", "generated_per_s", True),
    ("tokens / s (prompt + generated)", "tokens_per_s", True),
]


def main() -> None:
    args = parse_args()
    if args.side:
        harness.run_side(args, {"ours": run_ours, "trl": run_trl})
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        if not (work / "tiny-qwen2.5-vl").exists() or not (work / "demo-data").exists():
            from vlm_post.data.synthetic import write_demo_dataset
            from vlm_post.models.tiny import build_tiny_qwen2_5_vl

            build_tiny_qwen2_5_vl(work / "tiny-qwen2.5-vl", seed=0)
            train = max(64, args.prompts * (args.warmup + args.steps))
            write_demo_dataset(work / "demo-data", train=train, validation=8, test=8)
        flags = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--prompts={args.prompts}", f"--n={args.n}"]
        flags += [f"--max-new-tokens={args.max_new_tokens}", f"--seed={args.seed}"]
        comparison = harness.compare(__file__, args, work, flags, summarize_steps)
    results = comparison.results
    print(
        f"GRPO step, tiny Qwen2.5-VL, {args.prompts} prompts x n={args.n}, max {args.max_new_tokens} new tokens, one "
        f"thread; mean of {args.rounds} x {args.steps} steps (each run after {args.warmup} warm-up steps)"
    )
    print(harness.table(results, ROWS, one_decimal=lambda key: "tokens" in key))
    harness.print_times(comparison, time.perf_counter() - started)
    if "ours" in results and "trl" in results:
        per_round = comparison.per_round
        rounds = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(per_round["ours"], per_round["trl"])]
        print("ratio per round (wall): " + " ".join(f"{r:.3f}" for r in rounds))
        print(f"CPU-time ratio={results['ours']['tokens_per_s_cpu'] / results['trl']['tokens_per_s_cpu']:.3f}")
        print(f"ratio={results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
