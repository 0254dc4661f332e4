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
  vision encoder also shown) plus, on ours, the top-k extraction from its hidden states (TRL
  projects the teacher's hidden states onto the vocabulary inside its loss function, so that
  part of its teacher cost is in ``loss``); ``student forward`` is the student's base-model
  forward over prompt + response (vision encoder included, also shown); ``loss`` is the chunked
  divergence from hidden states (ours: ``topk_reverse_kl_and_entropy_from_hidden``; TRL:
  ``_chunked_divergence_loss``), forward only; ``backward``; ``optimizer`` (the AdamW step);
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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

LR = 1e-3  # configs/demo/opd.yaml
PIXELS = 12544  # configs/demo/opd.yaml: min_pixels = max_pixels = 112 * 112
TEACHER = dict(seed=1, hidden_size=256, num_layers=3)


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
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating ours and TRL; steps pooled")
    parser.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per side")
    parser.add_argument("--work-dir", help="where the tiny models and demo data go (default: a temporary folder)")
    # internal: one side, in a subprocess
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.n < 1:
        parser.error("--warmup, --steps, --rounds and --n must be at least 1 (steps are timed end to end)")
    return args


# --- shared instrumentation ------------------------------------------------------------------------


class Probe:
    """Per-step timers (wall and process CPU time) from hooks on the models, backward and the optimizer step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.in_generate = False
        self.last_end: float | None = None
        self.last_cpu_end: float | None = None
        self.tokens = (0, 0)  # (prompt, generated) tokens of the current step, set by the side's counter

    @staticmethod
    def now() -> tuple[float, float]:
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

    def timed_generation(self, fn):
        """``fn`` timed as ``generate``; the student's forward calls inside it count as generation."""

        def wrapper(*args, **kwargs):
            self.in_generate = True
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add("generate", start)
                self.in_generate = False

        return wrapper

    def hook(self, module, key: str, split_generation: bool = False) -> None:
        starts: list[tuple[float, float]] = []

        def pre(*_):
            starts.append(self.now())

        def post(*_):
            name = key + (("_gen" if self.in_generate else "_train") if split_generation else "")
            self.add(name, starts.pop())
            self.current[name + "_calls"] = self.current.get(name + "_calls", 0) + 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def install(self, student, teacher, processor_class) -> None:
        """Hooks on the student's and the teacher's base models, backward, the optimizer step and the processor."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.hook(student.model.visual, "vision", split_generation=True)
        self.hook(student.model.language_model, "decoder", split_generation=True)
        self.hook(student.model, "model", split_generation=True)
        self.hook(teacher.model.visual, "teacher_vision")
        self.hook(teacher.model, "teacher_model")
        torch.Tensor.backward = self.timed("backward", torch.Tensor.backward)
        optim_starts: list[tuple[float, float]] = []
        register_optimizer_step_pre_hook(lambda *_: optim_starts.append(self.now()))
        register_optimizer_step_post_hook(lambda *_: self.add("optim", optim_starts.pop()))
        processor_class.__call__ = self.timed("preprocess", processor_class.__call__)

    def end_step(self) -> None:
        wall, cpu = self.now()
        self.current["step"] = wall - self.last_end if self.last_end is not None else float("nan")
        self.current["step_cpu"] = cpu - self.last_cpu_end if self.last_cpu_end is not None else float("nan")
        self.current["prompt_tokens"], self.current["generated_tokens"] = self.tokens
        self.steps.append(self.current)
        self.current = {}
        self.last_end, self.last_cpu_end = wall, cpu


class StepProfiler:
    """torch.profiler over one step, its top operators kept as a table."""

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
            self.table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            self.prof = None


# --- one side ----------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    import lightning as L
    from lightning.pytorch import Callback

    import vlm_post.modules.distill as distill_module
    import vlm_post.teacher.scoring as scoring
    from vlm_post.data import DataSource, VLMDataModule
    from vlm_post.modules import DistillLossConfig, DistillModule, EvalConfig, OptimConfig, TeacherConfig
    from vlm_post.rollout import SamplingParams

    L.seed_everything(args.seed, verbose=False)
    probe = Probe()
    profiler = StepProfiler(args.profile, args.warmup + args.steps - 1)
    module = DistillModule(
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
    # Looked up by name at call time in their modules.
    distill_module.topk_reverse_kl_and_entropy_from_hidden = probe.timed(
        "loss", distill_module.topk_reverse_kl_and_entropy_from_hidden
    )
    scoring.topk_logprobs = probe.timed("teacher_head", scoring.topk_logprobs)
    module.teacher.score = probe.timed("teacher", module.teacher.score)
    engine_generate = module.engine.generate

    def counting_generate(policy, prompt, params, **kwargs):
        rollouts = engine_generate(policy, prompt, params, **kwargs)
        probe.tokens = (int(prompt["attention_mask"].sum()) * params.n, int(rollouts.lengths.sum()))
        return rollouts

    module.engine.generate = probe.timed_generation(counting_generate)
    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            profiler.start(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            probe.end_step()
            profiler.stop(batch_idx)

    data = VLMDataModule(
        train=DataSource("demo_train", path=str(work / "demo-data" / "train.parquet")),
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
        log_every_n_steps=50,  # Lightning's default; TRL's side logs nothing (logging_strategy="no")
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, data)
    return {"steps": probe.steps, "profile": profiler.table}


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import datasets
    import torch
    import trl.trainer.distillation_trainer as trl_distill
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.data_utils import prepare_multimodal_messages

    from vlm_post.data.collate import Collator
    from vlm_post.data.datamodule import ExampleDataset
    from vlm_post.data.prompting import DEFAULT_INSTRUCTION, IMAGE_MARKER
    from vlm_post.data.sampler import ResumableRandomSampler
    from vlm_post.data.sources import DataSource
    from vlm_post.rollout.hf import HFGenerateEngine

    probe = Probe()
    profiler = StepProfiler(args.profile, args.warmup + args.steps - 1)
    processor = AutoProcessor.from_pretrained(str(work / "student"))
    total = args.prompts * (args.warmup + args.steps)
    source = DataSource("demo_train", path=str(work / "demo-data" / "train.parquet"))
    examples_ds = ExampleDataset(source, PIXELS, PIXELS)
    order = list(ResumableRandomSampler(len(examples_ds), seed=args.seed))[:total]  # the order our side sees
    examples = [examples_ds[i] for i in order]

    def messages(example) -> list[dict]:
        # One image, then the question and our instruction: renders exactly as vlm_post's build_messages.
        text = example.question.replace(IMAGE_MARKER, "").strip() + "\n" + DEFAULT_INSTRUCTION
        return [{"role": "user", "content": text}]

    ours_text = Collator(processor).prompt_texts(examples[:1])[0]
    trl_text = processor.apply_chat_template(
        prepare_multimodal_messages(messages(examples[0]), images=examples[0].images),
        add_generation_prompt=True,
        tokenize=False,
    )
    if ours_text != trl_text:
        raise SystemExit(f"prompt texts differ:\n{ours_text!r}\n{trl_text!r}")
    rows = [e for e in examples for _ in range(args.n)]  # n > 1: each prompt n times in a row
    dataset = datasets.Dataset.from_dict({"prompt": [messages(e) for e in rows], "images": [e.images for e in rows]})

    def load(path: Path):
        return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")

    model, teacher = load(work / "student"), load(work / "teacher")
    engine = HFGenerateEngine(processor)
    # The same stop tokens as vlm_post's engine: TRL ends completions at the tokenizer's eos and every eos
    # id in the model's generation config.
    model.generation_config.eos_token_id = list(engine.stop_ids)
    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-opd-bench-"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.prompts * args.n,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,  # TRL defaults to True; vlm_post to False
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=1.0,  # reverse KL
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        shuffle_dataset=False,
        remove_unused_columns=False,
        # The same suppressed tokens as vlm_post's engine (TRL suppresses the image token alone by default).
        generation_kwargs={"suppress_tokens": engine.banned},
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
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

    class Timer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            profiler.start(state.global_step)

        def on_step_end(self, args_, state, control, **kwargs):
            probe.end_step()
            profiler.stop(state.global_step - 1)

    trainer.add_callback(Timer())
    torch.set_num_threads(1)
    trainer.train()
    return {"steps": probe.steps, "profile": profiler.table}


def run_side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    runner = run_ours if args.side == "ours" else run_trl
    result = runner(args, Path(args.work_dir))
    result["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))


# --- the report ------------------------------------------------------------------------------------


def summarize(steps: list[dict], skip: int) -> dict:
    """Means over the timed steps, wall and CPU (``<key>_cpu``); tokens/s = all tokens / all time."""
    timed = steps[skip:]
    out = {key: sum(s.get(key, 0.0) for s in timed) / len(timed) for key in sorted({k for s in timed for k in s})}
    tokens = sum(s["prompt_tokens"] + s["generated_tokens"] for s in timed)
    generated = sum(s["generated_tokens"] for s in timed)
    for suffix in ("", "_cpu"):
        elapsed = sum(s["step" + suffix] for s in timed)
        out["median_step" + suffix] = statistics.median(s["step" + suffix] for s in timed)
        # the headline: mean tokens per step over the median step time (robust to bursts of other load)
        out["tokens_per_s" + suffix] = tokens / len(timed) / out["median_step" + suffix]
        out["mean_tokens_per_s" + suffix] = tokens / elapsed
        out["generated_per_s" + suffix] = generated / len(timed) / out["median_step" + suffix]
        get = lambda key: out.get(key + suffix, 0.0)  # noqa: E731
        # ours: the teacher's score() call holds its forward and its top-k head; TRL: only the teacher's
        # base-model forward is apart from the loss
        out["teacher_all" + suffix] = get("teacher") if "teacher" in out else get("teacher_model")
        out["train_fwd" + suffix] = get("model_train")
        parts = ("preprocess", "generate", "teacher_all", "train_fwd", "loss", "backward", "optim")
        out["other" + suffix] = get("step") - sum(get(k) for k in parts)
    return out


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


def table(results: dict[str, dict]) -> str:
    """Wall-clock figures per side, then the same from the process's CPU time (equal on an idle machine)."""
    names = list(results)
    header = [f"{name} wall" for name in names] + [f"{name} CPU" for name in names]
    lines = [f"{'':34}" + "".join(f"{h:>11}" for h in header)]

    def fmt(value, key):
        if value is None:
            return f"{'-':>11}"
        return f"{value:>11.1f}" if "tokens" in key or key.endswith("per_s") else f"{value:>11.3f}"

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
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        raw: dict[str, list[dict]] = {side: [] for side in sides}
        per_round: dict[str, list[dict]] = {side: [] for side in sides}
        walls = {side: 0.0 for side in sides}
        for round_index in range(args.rounds):  # alternate the sides, so a busy spell hits both
            for side in sides:
                out = work / f"result-{side}-{round_index}.json"
                command = [sys.executable, __file__, "--side", side, "--result", str(out), "--work-dir", str(work)]
                command += [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--prompts={args.prompts}"]
                command += [f"--n={args.n}", f"--max-new-tokens={args.max_new_tokens}", f"--top-k={args.top_k}"]
                command += [f"--seed={args.seed}"] + (["--profile"] if args.profile and round_index == 0 else [])
                side_started = time.perf_counter()
                done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
                    raise SystemExit(f"the {side} side failed (exit {done.returncode})")
                walls[side] += time.perf_counter() - side_started
                result = json.loads(out.read_text())
                if result["threads"] != 1:
                    raise SystemExit(f"the {side} side ran on {result['threads']} threads")
                raw[side] += result["steps"][args.warmup :]
                per_round[side].append(summarize(result["steps"], args.warmup))
                if result.get("profile"):
                    print(f"== torch.profiler, one step, {side}\n{result['profile']}")
        results = {side: summarize(steps, 0) for side, steps in raw.items()}
    print(
        f"OPD step, tiny Qwen2.5-VL student (128 x 2) <- teacher (256 x 3), {args.prompts} prompts x n={args.n}, "
        f"max {args.max_new_tokens} new tokens, one thread; mean of {args.rounds} x {args.steps} steps "
        f"(each run after {args.warmup} warm-up steps)"
    )
    print(table(results))
    total = time.perf_counter() - started
    print(", ".join(f"{side}: {wall:.0f} s" for side, wall in walls.items()) + f"; total {total:.0f} s")
    busy = [side for side, r in results.items() if r["step_cpu"] < 0.9 * r["step"]]
    if busy:
        print(f"note: the machine was busy ({', '.join(busy)}: CPU time under 90% of wall); CPU figures are steadier")
    if "ours" in results and "trl" in results:
        ours, theirs = results["ours"], results["trl"]
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
