"""What bench/rl_step.py and bench/opd_step.py share: one training step of ours against TRL's, timed alike.

Each script documents its own setting and definitions (its module docstring); this module is the machinery
both use, so that the two comparisons time, count and report the same way:
- ``Probe``: per-step timers (wall and process CPU time) from hooks on the HF models, the autograd backward,
  the optimizer step and, where a side asks, the processor call; one step runs from the end of one optimizer
  step to the end of the next;
- ``StepProfiler``: a torch.profiler table of one step;
- what both sides run with, a step timer included: ``fit_ours`` (our module under a Lightning trainer),
  ``trl_examples`` (the prompts in our sampler's order, as TRL's messages), ``trl_config``, ``train_trl``;
- ``summarize`` / ``table``: means over the timed steps, token rates, the report table;
- ``compare``: each side in its own subprocess (the script re-run with ``--side``), ``--rounds`` times,
  alternating, with the timed steps pooled.

Not a benchmark: ``make bench`` runs every bench/*.py, and this one does nothing when run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = ("", "_cpu")  # a figure's key is wall time; the key + "_cpu" is the process's CPU time

# Each side's subprocess: one thread, offline, quiet.
SIDE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


# --- instrumentation -------------------------------------------------------------------------------


class Probe:
    """Per-step timers (wall and process CPU time) from hooks on the models, backward and the optimizer step.

    Installed the same way on both sides; what counts as generation (``timed_generation``) and what else is
    timed is each side's own (see the scripts' docstrings). ``tokens`` is set by the side's own counter.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.in_generate = False
        self.step_started: float | None = None
        self.last_end: float | None = None
        self.last_cpu_end: float | None = None
        self.tokens = (0, 0)  # (prompt, generated) tokens of the current step

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

    def timed_outside(self, key: str, fn, inner: str):
        """``fn`` timed as ``key``, less what the hooks timed as ``inner`` during the call: e.g. a log-prob call less
        its model forward is the head."""

        def wrapper(*args, **kwargs):
            start = self.now()
            before = {clock: self.current.get(inner + clock, 0.0) for clock in CLOCKS}
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, start)
                for clock in CLOCKS:
                    self.current[key + clock] -= self.current.get(inner + clock, 0.0) - before[clock]

        return wrapper

    def timed_generation(self, fn):
        """``fn`` timed as ``generate``; the student's forward calls inside it count as generation."""
        timed = self.timed("generate", fn)

        def wrapper(*args, **kwargs):
            self.in_generate = True
            try:
                return timed(*args, **kwargs)
            finally:
                self.in_generate = False

        return wrapper

    def hook(self, module, key: str, split_generation: bool = False) -> None:
        """Times ``module``'s forward calls as ``key`` (``key_gen`` / ``key_train`` when split), with a call count."""
        starts: list[tuple[float, float]] = []

        def pre(*_):
            starts.append(self.now())

        def post(*_):
            name = key + (("_gen" if self.in_generate else "_train") if split_generation else "")
            self.add(name, starts.pop())
            self.current[name + "_calls"] = self.current.get(name + "_calls", 0) + 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def install(self, student, teacher=None, processor_class=None) -> None:
        """Hooks on the student's base model (Qwen2_5_VLModel: vision encoder + language model), backward and the
        optimizer step; with ``teacher``, on its base model and vision encoder; with ``processor_class``, on the
        processor's ``__call__`` (``preprocess``)."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.hook(student.model.visual, "vision", split_generation=True)
        self.hook(student.model.language_model, "decoder", split_generation=True)
        self.hook(student.model, "model", split_generation=True)
        if teacher is not None:
            self.hook(teacher.model.visual, "teacher_vision")
            self.hook(teacher.model, "teacher_model")
        torch.Tensor.backward = self.timed("backward", torch.Tensor.backward)
        optim_starts: list[tuple[float, float]] = []
        register_optimizer_step_pre_hook(lambda *_: optim_starts.append(self.now()))
        register_optimizer_step_post_hook(lambda *_: self.add("optim", optim_starts.pop()))
        if processor_class is not None:
            processor_class.__call__ = self.timed("preprocess", processor_class.__call__)

    def timed_engine(self, engine_class: type) -> type:
        """Our side: a subclass of the rollout engine class whose ``sample`` (the engine's whole call: it may
        prefill outside model.generate) is timed as generation, and counts the step's tokens from the batch it
        returns (the prompts' attention mask, n times, and the responses' lengths)."""
        probe = self

        class TimedEngine(engine_class):
            def sample(self, policy, batch, params, logprobs=False, seed=None):
                samples = probe.timed_generation(super().sample)(policy, batch, params, logprobs, seed)
                probe.tokens = (int(samples.prompt["attention_mask"].sum()) * samples.n, int(samples.lengths.sum()))
                return samples

        return TimedEngine

    def start_step(self) -> None:
        self.step_started = time.perf_counter()

    def end_step(self) -> None:
        """Closes the step; what the hooks record before the next step starts (data loading) counts towards it."""
        wall, cpu = self.now()
        self.current["in_step"] = wall - self.step_started
        self.current["step"] = wall - self.last_end if self.last_end is not None else float("nan")
        self.current["step_cpu"] = cpu - self.last_cpu_end if self.last_cpu_end is not None else float("nan")
        self.current["prompt_tokens"], self.current["generated_tokens"] = self.tokens
        self.steps.append(self.current)
        self.current = {}
        self.last_end, self.last_cpu_end = wall, cpu


class StepProfiler:
    """torch.profiler over one step, its top operators kept as a table."""

    def __init__(self, enabled: bool, step: int, rows: int = 20) -> None:
        self.enabled, self.step, self.rows, self.prof, self.table = enabled, step, rows, None, None

    def start(self, index: int) -> None:
        if self.enabled and index == self.step:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def stop(self, index: int) -> None:
        if self.prof is not None and index == self.step:
            self.prof.__exit__(None, None, None)
            self.table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.rows)
            self.prof = None


# --- what both sides run with ----------------------------------------------------------------------


def fit_ours(module, args: argparse.Namespace, train_path: Path, pixels: int, probe: Probe, profiler: StepProfiler):
    """Our side: ``module`` trained for the warm-up and timed steps on the demo prompts (``--prompts`` a step),
    one CPU device, fp32, nothing logged, saved or validated; a step is one Lightning training batch."""
    import lightning as L
    from lightning.pytorch import Callback

    from vlm_post.data import DataSource, VLMDataModule

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            profiler.start(batch_idx)
            probe.start_step()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            probe.end_step()
            profiler.stop(batch_idx)

    data = VLMDataModule(
        train=DataSource("demo_train", path=str(train_path)),
        batch_size=args.prompts,
        min_pixels=pixels,
        max_pixels=pixels,
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


def trl_examples(processor, args: argparse.Namespace, train_path: Path, pixels: int) -> tuple[list, Callable]:
    """The examples our side sees, in our sampler's order, and ``messages(example)``: the example as TRL's chat
    messages, which render exactly as vlm_post's prompt (checked here on the first one)."""
    from trl.data_utils import prepare_multimodal_messages

    from vlm_post.data.collate import Collator
    from vlm_post.data.datamodule import ExampleDataset
    from vlm_post.data.prompting import DEFAULT_INSTRUCTION, IMAGE_MARKER
    from vlm_post.data.sampler import ResumableRandomSampler
    from vlm_post.data.sources import DataSource

    total = args.prompts * (args.warmup + args.steps)
    examples_ds = ExampleDataset(DataSource("demo_train", path=str(train_path)), pixels, pixels)
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
    return examples, messages


def load_trl_model(path: Path):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")


def trl_config(args: argparse.Namespace, lr: float, suppress_tokens: list[int]) -> dict:
    """TRL config fields both comparisons set alike: on the CPU in fp32, one optimizer step over all B*n rows
    (no gradient accumulation, no gradient checkpointing: TRL defaults to it, vlm_post does not), temperature 1.0
    without top-k / top-p, our suppressed tokens (TRL suppresses the image token alone by default), AdamW (torch's)
    at a constant ``lr`` without weight decay, clipping at 1.0, the prompts unshuffled (in our order), and no
    logging, saving or evaluation."""
    return {
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "seed": args.seed,
        "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": args.prompts * args.n,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
        "max_completion_length": args.max_new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "shuffle_dataset": False,
        "remove_unused_columns": False,
        "generation_kwargs": {"suppress_tokens": suppress_tokens},
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "log_completions": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def train_trl(trainer, probe: Probe, profiler: StepProfiler, count_tokens: Callable | None = None) -> dict:
    """TRL's side: ``trainer`` trained with a step timer; ``count_tokens(state)``, when given, returns the step's
    (prompt, generated) tokens at its end (else the side has set ``probe.tokens`` itself)."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            profiler.start(state.global_step)
            probe.start_step()

        def on_step_end(self, args_, state, control, **kwargs):
            if count_tokens is not None:
                probe.tokens = count_tokens(state)
            probe.end_step()
            profiler.stop(state.global_step - 1)

    trainer.add_callback(Timer())
    torch.set_num_threads(1)
    trainer.train()
    return {"steps": probe.steps, "profile": profiler.table}


# --- the report ------------------------------------------------------------------------------------


def summarize(steps: list[dict], skip: int, rate_over: str = "mean") -> dict:
    """Means over the timed steps (``steps[skip:]``) of every figure, wall and CPU (``<key>_cpu``), and the token
    rates: ``tokens_per_s`` (prompt + generated) and ``generated_per_s``, over the mean step (all tokens / all
    time) or, with ``rate_over="median"``, mean tokens per step / the median step time; ``mean_tokens_per_s`` is
    always over the mean step, ``median_step`` the median step time."""
    timed = steps[skip:]
    out = {key: sum(s.get(key, 0.0) for s in timed) / len(timed) for key in sorted({k for s in timed for k in s})}
    tokens = sum(s["prompt_tokens"] + s["generated_tokens"] for s in timed)
    generated = sum(s["generated_tokens"] for s in timed)
    for clock in CLOCKS:
        elapsed = sum(s["step" + clock] for s in timed)
        median = statistics.median(s["step" + clock] for s in timed)
        out["median_step" + clock] = median
        out["mean_tokens_per_s" + clock] = tokens / elapsed
        if rate_over == "median":  # robust to bursts of other load
            out["tokens_per_s" + clock] = tokens / len(timed) / median
            out["generated_per_s" + clock] = generated / len(timed) / median
        else:
            out["tokens_per_s" + clock] = tokens / elapsed
            out["generated_per_s" + clock] = generated / elapsed
    return out


def figures(summary: dict, clock: str) -> Callable[[str], float]:
    """``get(key)``: the summary's figure ``key`` on ``clock`` (0 when the side has none)."""
    return lambda key: summary.get(key + clock, 0.0)


def add_other(summary: dict, parts: tuple[str, ...]) -> dict:
    """``other``: the step time not in ``parts``, on both clocks."""
    for clock in CLOCKS:
        get = figures(summary, clock)
        summary["other" + clock] = get("step") - sum(get(k) for k in parts)
    return summary


def table(results: dict[str, dict], rows: list[tuple[str, str, bool]], one_decimal: Callable[[str], bool]) -> str:
    """Wall-clock figures per side, then the same from the process's CPU time (equal on an idle machine).

    ``rows``: (label, key, has a CPU-time figure); a figure whose key ``one_decimal`` accepts is shown to 0.1,
    the others (seconds) to 0.001."""
    names = list(results)
    header = [f"{name} wall" for name in names] + [f"{name} CPU" for name in names]
    lines = [f"{'':34}" + "".join(f"{h:>11}" for h in header)]

    def fmt(value, key):
        if value is None:
            return f"{'-':>11}"
        return f"{value:>11.1f}" if one_decimal(key) else f"{value:>11.3f}"

    for label, key, has_cpu in rows:
        cells = [fmt(results[name].get(key), key) for name in names]
        cells += [fmt(results[name].get(key + "_cpu") if has_cpu else None, key) for name in names]
        lines.append(f"{label:34}" + "".join(cells))
    return "\n".join(lines)


# --- the sides, each in a subprocess ---------------------------------------------------------------


def add_side_options(parser: argparse.ArgumentParser, work_dir_help: str) -> None:
    """The options of the comparison itself, and the internal ones of a side's subprocess."""
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating ours and TRL; steps pooled")
    parser.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per side")
    parser.add_argument("--work-dir", help=work_dir_help)
    # internal: one side, in a subprocess
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def run_side(args: argparse.Namespace, runners: dict[str, Callable[[argparse.Namespace, Path], dict]]) -> None:
    """In a side's subprocess: run it on one thread and write its steps (and profile) to ``--result``."""
    import torch

    torch.set_num_threads(1)
    result = runners[args.side](args, Path(args.work_dir))
    result["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))


@dataclass
class Comparison:
    results: dict[str, dict]  # per side: the summary of all timed steps, pooled over the rounds
    per_round: dict[str, list[dict]]  # per side: one summary per round
    walls: dict[str, float]  # per side: the wall time of its subprocesses


def compare(
    script: str,
    args: argparse.Namespace,
    work: Path,
    side_flags: list[str],
    summarize_steps: Callable[[list[dict], int], dict],
) -> Comparison:
    """Runs ``script --side <side> ... side_flags`` for each side, ``--rounds`` times, alternating the sides so
    that a busy spell on a shared machine hits both; each run's first ``--warmup`` steps are dropped."""
    env = dict(os.environ, **SIDE_ENV)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    raw: dict[str, list[dict]] = {side: [] for side in sides}
    per_round: dict[str, list[dict]] = {side: [] for side in sides}
    walls = {side: 0.0 for side in sides}
    for round_index in range(args.rounds):
        for side in sides:
            out = work / f"result-{side}-{round_index}.json"
            command = [sys.executable, script, "--side", side, "--result", str(out), "--work-dir", str(work)]
            command += side_flags + (["--profile"] if args.profile and round_index == 0 else [])
            side_started = time.perf_counter()
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
                raise SystemExit(f"the {side} side failed (exit {done.returncode})")
            walls[side] += time.perf_counter() - side_started
            result = json.loads(out.read_text())
            if result["threads"] != 1:
                raise SystemExit(f"the {side} side ran on {result['threads']} threads")
            raw[side] += result["steps"][args.warmup :]
            per_round[side].append(summarize_steps(result["steps"], args.warmup))
            if result.get("profile"):
                print(f"== torch.profiler, one step, {side}\n{result['profile']}")
    results = {side: summarize_steps(steps, 0) for side, steps in raw.items()}
    return Comparison(results, per_round, walls)


def print_times(comparison: Comparison, total_s: float) -> None:
    """Each side's wall time, the total, and a note when the machine was busy (CPU time well under wall time)."""
    print(", ".join(f"{side}: {wall:.0f} s" for side, wall in comparison.walls.items()) + f"; total {total_s:.0f} s")
    busy = [side for side, r in comparison.results.items() if r["step_cpu"] < 0.9 * r["step"]]
    if busy:
        print(
            f"note: the machine was busy ({', '.join(busy)}: CPU time under 90% of wall time); "
            "the CPU columns are the steadier figures"
        )
