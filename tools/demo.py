"""The CPU demo, end to end, exactly as a user would run it (``make demo``).

1. Build the tiny Qwen2.5-VL student, a larger tiny teacher and the synthetic data set if they are absent
   (offline, deterministic).
2. Warm start A, ``configs/demo/sft.yaml``: a short SFT (a weak warm start), exported in HF format;
   then ``configs/demo/rl.yaml``: GRPO from the SFT export.
3. Warm start B: ``configs/demo/teacher_sft.yaml`` trains the teacher; ``configs/demo/opd.yaml`` distills it
   on-policy into the base student; then the same GRPO from the OPD export.
4. ``vlm_post test`` on every model: base, sft, rl_from_sft, teacher, opd, rl_from_opd.
5. Print a table and write ``runs/demo/summary.json``: one row per model evaluated, each with its entropy.

``--seed N`` reruns the whole chain with another seed (data order, sampling, initial RNG) into
``runs/demo-seed<N>``, to check that the margins hold beyond one lucky seed.

Exits non-zero when a stage fails, when SFT or OPD does not beat the base model by ``MIN_STAGE1_GAIN``, or when
RL does not beat SFT by ``MIN_RL_GAIN`` (greedy accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path("runs/demo")
TINY_MODEL = Path("artifacts/tiny-qwen2.5-vl")
TINY_TEACHER = Path("artifacts/tiny-qwen2.5-vl-teacher")  # hidden 256, 3 layers: about 4x the student
DEMO_DATA = Path("artifacts/demo-data")
MIN_STAGE1_GAIN = 0.2
MIN_RL_GAIN = 0.05


def run(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "vlm_post"), *args]
    print(f"\n$ {' '.join(['vlm_post', *args])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"demo: '{' '.join(['vlm_post', *args])}' failed")


def evaluate(runs: Path, label: str, init_from: str | None, model: str | None = None) -> list[dict]:
    out = runs / "eval" / label
    args = ["test", "--config", "configs/demo/eval.yaml", f"--model.init_args.eval.output_dir={out}"]
    if init_from:
        args.append(f"--model.init_args.init_from={init_from}")
    if model:  # another architecture than the student's (the teacher)
        args.append(f"--model.init_args.model_name_or_path={model}")
    run(*args)
    summary = json.loads((ROOT / out / "summary.json").read_text())
    return [{"model": label, **row, "weights": init_from or "random init"} for row in summary["results"]]


def fit(config: str, root: Path, seed: int | None, *args: str) -> None:
    extra = [] if seed is None else [f"--seed_everything={seed}", f"--data.seed={seed}"]
    run("fit", "--config", config, f"--trainer.default_root_dir={root}", *extra, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="rerun with this seed, into runs/demo-seed<N>")
    seed = parser.parse_args().seed
    runs = RUNS if seed is None else Path(f"runs/demo-seed{seed}")
    os.chdir(ROOT)
    started = time.time()
    if not (TINY_MODEL / "config.json").exists():
        from vlm_post.models.tiny import build_tiny_qwen2_5_vl

        print(f"building the tiny model in {TINY_MODEL}")
        build_tiny_qwen2_5_vl(TINY_MODEL)
    if not (TINY_TEACHER / "config.json").exists():
        from vlm_post.models.tiny import build_tiny_qwen2_5_vl

        print(f"building the tiny teacher in {TINY_TEACHER}")
        build_tiny_qwen2_5_vl(TINY_TEACHER, seed=1, hidden_size=256, num_layers=3)
    if not all((DEMO_DATA / f"{split}.parquet").exists() for split in ("train", "validation", "test")):
        from vlm_post.data.synthetic import write_demo_dataset

        print(f"building the demo data set in {DEMO_DATA}")
        write_demo_dataset(DEMO_DATA)
    shutil.rmtree(runs, ignore_errors=True)  # a demo run starts clean: no stale checkpoints to pick "best" from

    fit("configs/demo/sft.yaml", runs / "sft", seed)
    fit("configs/demo/rl.yaml", runs / "rl", seed, f"--model.init_args.init_from={runs / 'sft' / 'export'}")
    fit("configs/demo/teacher_sft.yaml", runs / "teacher", seed)
    teacher = runs / "teacher" / "export"
    fit("configs/demo/opd.yaml", runs / "opd", seed, f"--model.init_args.teacher.model_name_or_path={teacher}",
        f"--model.init_args.teacher.cache_dir={runs / 'opd' / 'teacher_cache'}")  # fmt: skip
    fit("configs/demo/rl.yaml", runs / "rl_from_opd", seed, f"--model.init_args.init_from={runs / 'opd' / 'export'}")
    rows = evaluate(runs, "base", None) + evaluate(runs, "sft", str(runs / "sft" / "export"))
    rows += evaluate(runs, "rl_from_sft", str(runs / "rl" / "export"))
    rows += evaluate(runs, "teacher", None, model=str(teacher))
    rows += evaluate(runs, "opd", str(runs / "opd" / "export"))
    rows += evaluate(runs, "rl_from_opd", str(runs / "rl_from_opd" / "export"))

    from vlm_post.modules.evaluation import format_table

    (ROOT / runs / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    shown = ["model", "dataset", "accuracy", "mean_accuracy", "pass@16", "entropy", "mean_distinct_answers", "format_rate"]
    print("\n" + format_table([{k: r[k] for k in shown if k in r} for r in rows]))
    print(f"\nsummary written to {runs / 'summary.json'} ({time.time() - started:.0f} s in all)")
    accuracy = {row["model"]: row["accuracy"] for row in rows}
    for stage in ("sft", "opd"):
        if accuracy[stage] - accuracy["base"] < MIN_STAGE1_GAIN:
            sys.exit(f"demo: {stage} accuracy {accuracy[stage]:.3f} is not {MIN_STAGE1_GAIN} above base {accuracy['base']:.3f}")
    if accuracy["rl_from_sft"] - accuracy["sft"] < MIN_RL_GAIN:
        sys.exit(f"demo: RL accuracy {accuracy['rl_from_sft']:.3f} is not {MIN_RL_GAIN} above SFT {accuracy['sft']:.3f}")


if __name__ == "__main__":
    main()
