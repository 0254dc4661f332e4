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
  (ours: the chunked function; TRL: the rest of its top-level forward: lm_head, log-softmax,
  entropy), ``backward``, ``optimizer`` (the AdamW step), ``reward``, and ``other`` = the rest
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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating ours and TRL; steps pooled")
    parser.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per side")
    parser.add_argument("--work-dir", help="where the tiny model and demo data go (default: a temporary folder)")
    # internal: one side, in a subprocess
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1 (a step is timed from the end of the one before)")
    return args


# --- shared instrumentation ------------------------------------------------------------------------


class Probe:
    """Per-step timers from hooks on the HF model, the autograd backward and the optimizer step.

    Installed the same way on both sides; what counts as generation and as the head is each
    side's own (see the module docstring).
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.in_generate = False
        self.step_started: float | None = None
        self.last_end: float | None = None
        self.last_cpu_end: float | None = None
        self.pending = (0, 0)  # (prompt, generated) tokens of the current step, set by the side's counter
        self.generated = 0

    @staticmethod
    def now() -> tuple[float, float]:
        """(wall, CPU time of this process): the CPU time is what a busy machine does not inflate much."""
        return time.perf_counter(), time.process_time()

    def add(self, key: str, start: tuple[float, float]) -> None:
        wall, cpu = self.now()
        self.current[key] = self.current.get(key, 0.0) + wall - start[0]
        self.current[key + "_cpu"] = self.current.get(key + "_cpu", 0.0) + cpu - start[1]

    def timed(self, key: str, fn):
        def wrapper(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, start)

        return wrapper

    def _hook_module(self, module, key: str) -> None:
        starts: list[tuple[float, float]] = []

        def pre(*_):
            starts.append(self.now())

        def post(*_):
            name = f"{key}_gen" if self.in_generate else f"{key}_train"
            self.add(name, starts.pop())
            self.current[name + "_calls"] = self.current.get(name + "_calls", 0) + 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def timed_generation(self, fn):
        """``fn`` timed as ``generate``; the model's forward calls inside it count as generation."""

        def wrapper(*args, **kwargs):
            self.in_generate = True
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add("generate", start)
                self.in_generate = False

        return wrapper

    def install(self, model, wrap_generate: bool = True) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        base = model.model  # Qwen2_5_VLModel: vision encoder + language model
        self._hook_module(base.visual, "vision")
        self._hook_module(base.language_model, "decoder")
        self._hook_module(base, "model")
        if wrap_generate:
            model.generate = self.timed_generation(model.generate)
        torch.Tensor.backward = self.timed("backward", torch.Tensor.backward)
        optim_starts: list[tuple[float, float]] = []
        register_optimizer_step_pre_hook(lambda *_: optim_starts.append(self.now()))
        register_optimizer_step_post_hook(lambda *_: self.add("optim_step", optim_starts.pop()))

    def start_step(self) -> None:
        self.current = {}
        self.step_started = time.perf_counter()

    def end_step(self, prompt_tokens: int, generated_tokens: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.current["in_step"] = now - self.step_started
        self.current["step"] = now - self.last_end if self.last_end is not None else float("nan")
        self.current["step_cpu"] = cpu - self.last_cpu_end if self.last_cpu_end is not None else float("nan")
        self.current["prompt_tokens"] = prompt_tokens
        self.current["generated_tokens"] = generated_tokens
        self.steps.append(self.current)
        self.last_end, self.last_cpu_end = now, cpu


class StepProfiler:
    """torch.profiler over one step, its top operators written into the result."""

    def __init__(self, enabled: bool, step: int) -> None:
        self.enabled, self.step, self.prof, self.table = enabled, step, None, None

    def start(self, index: int) -> None:
        if self.enabled and index == self.step:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def stop(self, index: int) -> None:
        if self.prof is not None and index == self.step:
            self.prof.__exit__(None, None, None)
            self.table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
            self.prof = None


# --- one side ----------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict:
    import lightning as L
    from lightning.pytorch import Callback

    import vlm_post.modules.base as base_module
    from vlm_post.data import DataSource, VLMDataModule
    from vlm_post.losses import GRPOLossConfig
    from vlm_post.modules import EvalConfig, OptimConfig, RLModule
    from vlm_post.rewards import MathReward
    from vlm_post.rollout import SamplingParams

    L.seed_everything(args.seed, verbose=False)
    probe = Probe()
    profiler = StepProfiler(args.profile, args.warmup + args.steps - 1)
    reward = MathReward()
    module = RLModule(
        str(model_dir),
        optim=OptimConfig(lr=LR, schedule="constant"),
        eval=EvalConfig(n=0, greedy=True, max_new_tokens=args.max_new_tokens),
        rollout=SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens),
        loss=GRPOLossConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, aggregation="token-mean", kl_mode="off"),
        reward=reward,
        micro_batch_size=args.prompts * args.n,
        ppo_epochs=1,
        grad_clip=1.0,
    )
    module.configure_model()
    # Generation is the rollout engine's whole call (it may prefill outside model.generate).
    probe.install(module.policy, wrap_generate=False)
    module.reward_fn = probe.timed("reward", module.reward_fn)
    # The chunked log-prob/entropy head, looked up by name in base.py at call time.
    base_module.token_logprobs_and_entropy = probe.timed("head", base_module.token_logprobs_and_entropy)
    engine_generate = module.engine.generate

    def counting_generate(policy, prompt, params, **kwargs):
        rollouts = engine_generate(policy, prompt, params, **kwargs)
        probe.pending = (int(prompt["attention_mask"].sum()) * params.n, int(rollouts.lengths.sum()))
        return rollouts

    module.engine.generate = probe.timed_generation(counting_generate)

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            profiler.start(batch_idx)
            probe.start_step()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            probe.end_step(*probe.pending)
            profiler.stop(batch_idx)

    data = VLMDataModule(
        train=DataSource("demo_train", path=str(data_dir / "train.parquet")),
        batch_size=args.prompts,
        min_pixels=PIXELS,
        max_pixels=PIXELS,
        seed=args.seed,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, data)
    return {"steps": probe.steps, "profile": profiler.table}


def run_trl(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from vlm_post.data.collate import Collator
    from vlm_post.data.datamodule import ExampleDataset
    from vlm_post.data.prompting import DEFAULT_INSTRUCTION, IMAGE_MARKER
    from vlm_post.data.sampler import ResumableRandomSampler
    from vlm_post.data.sources import DataSource
    from vlm_post.rewards import MathReward
    from vlm_post.rollout.hf import HFGenerateEngine

    probe = Probe()
    profiler = StepProfiler(args.profile, args.warmup + args.steps - 1)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    total = args.prompts * (args.warmup + args.steps)
    examples_ds = ExampleDataset(DataSource("demo_train", path=str(data_dir / "train.parquet")), PIXELS, PIXELS)
    order = list(ResumableRandomSampler(len(examples_ds), seed=args.seed))[:total]  # the order our side sees
    examples = [examples_ds[i] for i in order]

    def messages(example) -> list[dict]:
        # One image, then the question and our instruction: renders exactly as vlm_post's build_messages.
        text = example.question.replace(IMAGE_MARKER, "").strip() + "\n" + DEFAULT_INSTRUCTION
        return [{"role": "user", "content": text}]

    ours_text = Collator(processor).prompt_texts(examples[:1])[0]
    trl_text = processor.apply_chat_template(
        prepare_multimodal_messages(messages(examples[0]), images=examples[0].images), add_generation_prompt=True, tokenize=False
    )
    if ours_text != trl_text:
        raise SystemExit(f"prompt texts differ:\n{ours_text!r}\n{trl_text!r}")
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [messages(e) for e in examples],
            "images": [e.images for e in examples],
            "row": list(range(len(examples))),
        }
    )
    math_reward = MathReward()

    def math_reward_fn(prompts, completions, completion_ids, row, **kwargs) -> list[float]:
        start = probe.now()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = math_reward(texts, [examples[i] for i in row]).reward
        probe.add("reward", start)
        probe.generated = sum(len(ids) for ids in completion_ids)
        return out

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    # Same suppressed tokens as vlm_post's engine (TRL suppresses the image token alone by default).
    banned = HFGenerateEngine(processor).banned
    config = GRPOConfig(
        output_dir=str(data_dir.parent / "trl-output"),  # nothing is saved
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.prompts * args.n,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,  # TRL defaults to True; vlm_post to False
        num_generations=args.n,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        loss_type="dapo",  # token-mean over the batch
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        shuffle_dataset=False,
        remove_unused_columns=False,
        generation_kwargs={"suppress_tokens": banned},
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=math_reward_fn, args=config, train_dataset=dataset, processing_class=processor
    )
    probe.install(trainer.model)
    # TRL's head: everything the top-level forward does after the base model (lm_head, log-softmax, entropy).
    top_starts: list[tuple[float, float]] = []
    trainer.model.register_forward_pre_hook(lambda *_: top_starts.append(probe.now()))

    def top_post(*_):
        start = top_starts.pop()
        if not probe.in_generate:
            probe.add("top_train", start)

    trainer.model.register_forward_hook(top_post)
    seen = {"tokens": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            profiler.start(state.global_step)
            probe.start_step()

        def on_step_end(self, args_, state, control, **kwargs):
            processed = state.num_input_tokens_seen - seen["tokens"]
            seen["tokens"] = state.num_input_tokens_seen
            probe.end_step(processed - probe.generated, probe.generated)
            profiler.stop(state.global_step - 1)

    trainer.add_callback(Timer())
    torch.set_num_threads(1)
    trainer.train()
    return {"steps": probe.steps, "profile": profiler.table}


def run_side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    runner = run_ours if args.side == "ours" else run_trl
    result = runner(args, work / "tiny-qwen2.5-vl", work / "demo-data")
    result["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))


# --- the report ------------------------------------------------------------------------------------


def summarize(steps: list[dict], warmup: int) -> dict:
    """Means over the timed steps, wall and CPU (``<key>_cpu``) figures; tokens/s = all tokens / all time."""
    timed = steps[warmup:]
    out = {key: sum(s.get(key, 0.0) for s in timed) / len(timed) for key in sorted({k for s in timed for k in s})}
    tokens = sum(s["prompt_tokens"] + s["generated_tokens"] for s in timed)
    out["tokens_per_s"] = tokens / sum(s["step"] for s in timed)
    out["tokens_per_s_cpu"] = tokens / sum(s["step_cpu"] for s in timed)
    out["generated_per_s"] = sum(s["generated_tokens"] for s in timed) / sum(s["step"] for s in timed)
    out["generated_per_s_cpu"] = sum(s["generated_tokens"] for s in timed) / sum(s["step_cpu"] for s in timed)
    for suffix in ("", "_cpu"):
        get = lambda key: out.get(key + suffix, 0.0)  # noqa: E731
        # TRL's base-model forward runs inside its top-level forward; its head is the difference.
        if "top_train" in out:
            out["head" + suffix] = get("top_train") - get("model_train")
        out["train_fwd" + suffix] = get("model_train")
        out["optim" + suffix] = get("optim_step")
        parts = ("generate", "train_fwd", "head", "backward", "optim", "reward")
        out["other" + suffix] = get("step") - sum(get(k) for k in parts)
    return out


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


def table(results: dict[str, dict]) -> str:
    """Wall-clock figures per side, then the same from the process's CPU time (equal on an idle machine)."""
    names = list(results)
    header = [f"{name} wall" for name in names] + [f"{name} CPU" for name in names]
    lines = [f"{'':34}" + "".join(f"{h:>11}" for h in header)]
    fmt = lambda value, key: f"{'-':>11}" if value is None else f"{value:>11.1f}" if "tokens" in key else f"{value:>11.3f}"  # noqa: E731
    for label, key, has_cpu in ROWS:
        cells = [fmt(results[name].get(key), key) for name in names]
        cells += [fmt(results[name].get(key + "_cpu") if has_cpu else None, key) for name in names]
        lines.append(f"{label:34}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.side:
        run_side(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        if not (work / "tiny-qwen2.5-vl").exists() or not (work / "demo-data").exists():
            from vlm_post.data.synthetic import write_demo_dataset
            from vlm_post.models.tiny import build_tiny_qwen2_5_vl

            build_tiny_qwen2_5_vl(work / "tiny-qwen2.5-vl", seed=0)
            write_demo_dataset(work / "demo-data", train=max(64, args.prompts * (args.warmup + args.steps)), validation=8, test=8)
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        raw: dict[str, list[dict]] = {side: [] for side in sides}
        per_round: dict[str, list[dict]] = {side: [] for side in sides}
        walls = {side: 0.0 for side in sides}
        started = time.perf_counter()
        for round_index in range(args.rounds):  # alternate the sides, so a busy spell hits both
            for side in sides:
                out = work / f"result-{side}-{round_index}.json"
                command = [sys.executable, __file__, "--side", side, "--result", str(out), "--work-dir", str(work)]
                command += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--prompts={args.prompts}", f"--n={args.n}"]
                command += [f"--max-new-tokens={args.max_new_tokens}", f"--seed={args.seed}"]
                command += ["--profile"] if args.profile and round_index == 0 else []
                side_started = time.perf_counter()
                done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
                    raise SystemExit(f"the {side} side failed (exit {done.returncode})")
                walls[side] += time.perf_counter() - side_started
                result = json.loads(out.read_text())
                raw[side] += result["steps"][args.warmup :]
                per_round[side].append(summarize(result["steps"], args.warmup))
                if result.get("profile"):
                    print(f"== torch.profiler, one step, {side}\n{result['profile']}")
        results = {side: summarize(steps, 0) for side, steps in raw.items()}
    print(
        f"GRPO step, tiny Qwen2.5-VL, {args.prompts} prompts x n={args.n}, max {args.max_new_tokens} new tokens, one "
        f"thread; mean of {args.rounds} x {args.steps} steps (each run after {args.warmup} warm-up steps)"
    )
    print(table(results))
    print(", ".join(f"{side}: {wall:.0f} s" for side, wall in walls.items()) + f"; total {time.perf_counter() - started:.0f} s")
    busy = [side for side, r in results.items() if r["step_cpu"] < 0.9 * r["step"]]
    if busy:
        print(f"note: the machine was busy ({', '.join(busy)}: CPU time under 90% of wall time); the CPU columns are the steadier figures")
    if "ours" in results and "trl" in results:
        rounds = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(per_round["ours"], per_round["trl"])]
        print("ratio per round (wall): " + " ".join(f"{r:.3f}" for r in rounds))
        print(f"CPU-time ratio={results['ours']['tokens_per_s_cpu'] / results['trl']['tokens_per_s_cpu']:.3f}")
        print(f"ratio={results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
