"""Time of ``vlm_post study report`` at the study's default 10,000 bootstrap resamples, on the demo's shape.

The report trains nothing; its time is the bootstraps: every paired difference twice (over seeds and problems,
and over problems only), every pooled cell and row, and the pass@k figure's error bars (one interval per arm,
point, data set and k). This builds the plan of ``configs/study/demo.yaml`` (3 arms and the base model, 2 data
sets of 200 problems, 16 samples each) in a temporary folder, writes evaluation files of random answers for each
evaluation stage (no model runs), and times ``build_report``. Goal: under 30 s on this machine. Run with
``OMP_NUM_THREADS=1``::

    OMP_NUM_THREADS=1 .venv/bin/python bench/study_report.py [--seeds 1 3] [--resamples 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlm_post.study import build_plan, load_study  # noqa: E402
from vlm_post.study.report import build_report  # noqa: E402

PROBLEMS = 200  # the demo's test and out-of-domain sets (tools/demo.py)


def write_evaluations(plan, rng: random.Random) -> None:
    """For each evaluation stage, each data set: per-problem records of 16 graded samples, and the done marker."""
    n = plan.evaluation.n
    for stage in plan.stages:
        if stage.command != "test":
            continue
        stage.eval_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for dataset in plan.evaluation.datasets:
            skill = rng.random()
            records = []
            for index in range(PROBLEMS):
                correct = [rng.random() < skill for _ in range(n)]
                records.append({"id": f"{dataset.name}-{index}", "answer": "a", "greedy_correct": correct[0],
                                "correct": correct, "extracted": [rng.choice("abcd") for _ in range(n)],
                                "mean_token_entropy": rng.uniform(0.2, 2.0)})  # fmt: skip
            with open(stage.eval_dir / f"{dataset.name}.jsonl", "w") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
            accuracy = sum(r["greedy_correct"] for r in records) / PROBLEMS
            results.append({"dataset": dataset.name, "problems": PROBLEMS, "accuracy": accuracy, "entropy": 1.0})
        (stage.eval_dir / "summary.json").write_text(json.dumps({"results": results}))
        stage.mark_finished()


def time_report(seeds: int, resamples: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        overrides = [f"--seeds={list(range(seeds))}", f"--study_dir={folder}/study",
                     f"--evaluation.bootstrap_resamples={resamples}"]  # fmt: skip
        os.chdir(ROOT)
        plan = build_plan(load_study("configs/study/demo.yaml", overrides))
        plan.save()
        write_evaluations(plan, random.Random(seeds))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the report's own lines
            build_report(plan.study_path)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3], help="seeds per arm, one timing each")
    parser.add_argument("--resamples", type=int, default=10_000)
    args = parser.parse_args()
    print(f"study report, demo shape (3 arms + base, 2 sets x {PROBLEMS} problems x 16 samples), "
          f"{args.resamples} resamples, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")  # fmt: skip
    timings = {seeds: time_report(seeds, args.resamples) for seeds in args.seeds}
    for seeds, seconds in timings.items():
        print(f"| {seeds} seed(s) | {seconds:.1f} s |")
    print(" ".join(f"report_s_{seeds}_seeds={seconds:.2f}" for seeds, seconds in timings.items()) + " goal_s=30")


if __name__ == "__main__":
    main()
