"""The CPU demo, end to end, exactly as a user would run it (``make demo``).

1. Build the tiny Qwen2.5-VL and the synthetic data set if they are absent (offline, deterministic).
2. ``vlm_post fit --config configs/demo/sft.yaml``: a short SFT (a weak warm start), exported in HF format.
3. ``vlm_post fit --config configs/demo/rl.yaml``: GRPO from the SFT export.
4. ``vlm_post test`` on the untrained (base) model, the SFT export and the RL export.
5. Print a table and write ``runs/demo/summary.json``: one row per model evaluated.

Exits non-zero when a stage fails, when SFT does not beat the base model by ``MIN_SFT_GAIN``, or when RL
does not beat SFT by ``MIN_RL_GAIN`` (greedy accuracy).
"""

from __future__ import annotations

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
DEMO_DATA = Path("artifacts/demo-data")
MIN_SFT_GAIN = 0.2
MIN_RL_GAIN = 0.05


def run(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "vlm_post"), *args]
    print(f"\n$ {' '.join(['vlm_post', *args])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"demo: '{' '.join(['vlm_post', *args])}' failed")


def evaluate(label: str, init_from: str | None) -> list[dict]:
    out = RUNS / "eval" / label
    args = ["test", "--config", "configs/demo/eval.yaml", f"--model.init_args.eval.output_dir={out}"]
    if init_from:
        args.append(f"--model.init_args.init_from={init_from}")
    run(*args)
    summary = json.loads((ROOT / out / "summary.json").read_text())
    return [{"model": label, **row, "weights": init_from or "random init"} for row in summary["results"]]


def main() -> None:
    os.chdir(ROOT)
    started = time.time()
    if not (TINY_MODEL / "config.json").exists():
        from vlm_post.models.tiny import build_tiny_qwen2_5_vl

        print(f"building the tiny model in {TINY_MODEL}")
        build_tiny_qwen2_5_vl(TINY_MODEL)
    if not all((DEMO_DATA / f"{split}.parquet").exists() for split in ("train", "validation", "test")):
        from vlm_post.data.synthetic import write_demo_dataset

        print(f"building the demo data set in {DEMO_DATA}")
        write_demo_dataset(DEMO_DATA)
    shutil.rmtree(RUNS, ignore_errors=True)  # a demo run starts clean: no stale checkpoints to pick "best" from

    run("fit", "--config", "configs/demo/sft.yaml")
    run("fit", "--config", "configs/demo/rl.yaml", f"--model.init_args.init_from={RUNS / 'sft' / 'export'}")
    rows = evaluate("base", None) + evaluate("sft", str(RUNS / "sft" / "export"))
    rows += evaluate("rl_from_sft", str(RUNS / "rl" / "export"))

    from vlm_post.modules.base import format_table

    (ROOT / RUNS / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    shown = ["model", "dataset", "accuracy", "mean_accuracy", "pass@16", "entropy", "mean_distinct_answers", "format_rate"]
    print("\n" + format_table([{k: r[k] for k in shown if k in r} for r in rows]))
    print(f"\nsummary written to {RUNS / 'summary.json'} ({time.time() - started:.0f} s in all)")
    accuracy = {row["model"]: row["accuracy"] for row in rows}
    if accuracy["sft"] - accuracy["base"] < MIN_SFT_GAIN:
        sys.exit(f"demo: SFT accuracy {accuracy['sft']:.3f} is not {MIN_SFT_GAIN} above base {accuracy['base']:.3f}")
    if accuracy["rl_from_sft"] - accuracy["sft"] < MIN_RL_GAIN:
        sys.exit(f"demo: RL accuracy {accuracy['rl_from_sft']:.3f} is not {MIN_RL_GAIN} above SFT {accuracy['sft']:.3f}")


if __name__ == "__main__":
    main()
