"""The CPU demo (``make demo``): the warm-start study on tiny models, as one ``vlm_post study`` command.

1. Build the tiny Qwen2.5-VL student, a larger tiny teacher and the synthetic data sets if they are absent
   (offline, deterministic): the in-domain task in Geometry3K's layout and an out-of-domain set in MathVista's.
2. ``vlm_post study --config configs/study/demo.yaml``: the teacher's SFT (shared), then three arms, OPD,
   early-stopped SFT and over-trained SFT, each followed by the same GRPO; every model evaluated by one protocol;
   the report (``runs/study/demo/results.md``, ``results.json``, ``differences.json``, ``figures/``).
3. Check the demo's floors on the in-domain test set: every warm start enters RL below ``MAX_ENTRY`` greedy
   accuracy (RL has room), and, in sampled accuracy (mean@16, what RL's reward measures), each warm start is at
   least ``MIN_STAGE1_GAIN`` above the base model, RL adds at least ``MIN_RL_GAIN`` to at least one arm, and no
   arm's RL ends more than ``MAX_RL_LOSS`` below its entry. Greedy accuracy is reported, not floored: on this toy
   RL moves it by about as much as one evaluation's noise (README).

``--seed N`` runs the study with seed N into ``runs/study/demo-seed<N>``, to check that the floors hold beyond
one lucky seed. ``--artifacts-only`` builds step 1 and stops. The study resumes where it stopped when rerun;
``--fresh`` deletes its folder first.
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
STUDY = "configs/study/demo.yaml"
TINY_MODEL = Path("artifacts/tiny-qwen2.5-vl")
TINY_TEACHER = Path("artifacts/tiny-qwen2.5-vl-teacher")  # hidden 256, 3 layers: about 4x the student
DEMO_DATA = Path("artifacts/demo-data")
IN_DOMAIN = "demo_test"
FLOORED = "mean_accuracy"  # mean@16: the sampled correctness that RL's reward is
MAX_ENTRY = 0.9  # greedy accuracy at RL entry
MIN_STAGE1_GAIN = 0.2
MIN_RL_GAIN = 0.05
MAX_RL_LOSS = 0.02


def build_artifacts() -> None:
    from vlm_post.data.synthetic import write_demo_dataset
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    if not (TINY_MODEL / "config.json").exists():
        print(f"building the tiny model in {TINY_MODEL}")
        build_tiny_qwen2_5_vl(TINY_MODEL)
    if not (TINY_TEACHER / "config.json").exists():
        print(f"building the tiny teacher in {TINY_TEACHER}")
        build_tiny_qwen2_5_vl(TINY_TEACHER, seed=1, hidden_size=256, num_layers=3)
    splits = ("train.parquet", "validation.parquet", "test.parquet", "ood_test.parquet")
    if not all((DEMO_DATA / name).exists() for name in splits):
        print(f"building the demo data sets in {DEMO_DATA}")
        write_demo_dataset(DEMO_DATA)


def floors(rows: list[dict]) -> list[str]:
    """What the demo promises, on the in-domain test set; one message per broken floor."""
    accuracy = {(r["arm"], r["point"]): r[FLOORED] for r in rows if r["dataset"] == IN_DOMAIN}
    greedy = {(r["arm"], r["point"]): r["accuracy"] for r in rows if r["dataset"] == IN_DOMAIN}
    base = accuracy[("base", "entry")]
    arms = sorted({arm for arm, point in accuracy if arm != "base"})
    broken = [f"{arm}: enters RL at {greedy[(arm, 'entry')]:.3f} greedy, not below {MAX_ENTRY}"
              for arm in arms if greedy[(arm, "entry")] >= MAX_ENTRY]  # fmt: skip
    for arm in arms:
        entry, end = accuracy[(arm, "entry")], accuracy[(arm, "end")]
        if entry - base < MIN_STAGE1_GAIN:
            broken.append(f"{arm}: warm start {entry:.3f} is not {MIN_STAGE1_GAIN} above base {base:.3f}")
        if end < entry - MAX_RL_LOSS:
            broken.append(f"{arm}: RL ends at {end:.3f}, more than {MAX_RL_LOSS} below its entry {entry:.3f}")
    if not any(accuracy[(arm, "end")] - accuracy[(arm, "entry")] >= MIN_RL_GAIN for arm in arms):
        broken.append(f"RL adds {MIN_RL_GAIN} to no arm")
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed", type=int, default=None, help="run the study with this seed, into runs/study/demo-seed<N>"
    )
    parser.add_argument("--artifacts-only", action="store_true", help="build the tiny models and data sets, then stop")
    parser.add_argument("--fresh", action="store_true", help="delete the study folder first")
    args = parser.parse_args()
    os.chdir(ROOT)
    build_artifacts()
    if args.artifacts_only:
        return
    started = time.time()
    study_dir = Path("runs/study/demo" if args.seed is None else f"runs/study/demo-seed{args.seed}")
    if args.fresh:
        shutil.rmtree(study_dir, ignore_errors=True)
    command = ["vlm_post", "study", "--config", STUDY]
    if args.seed is not None:
        command += [f"--seeds=[{args.seed}]", f"--study_dir={study_dir}"]
    print(f"$ {' '.join(command)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    executable = [str(Path(sys.executable).parent / "vlm_post"), *command[1:]]
    if subprocess.run(executable, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"demo: '{' '.join(command)}' failed")
    rows = json.loads((study_dir / "results.json").read_text())
    print(f"\nfigures: {', '.join(str(p) for p in sorted((study_dir / 'figures').glob('*.png')))}")
    print(f"study written to {study_dir} ({time.time() - started:.0f} s in all)")
    broken = floors(rows)
    if broken:
        sys.exit("demo: " + "; ".join(broken))


if __name__ == "__main__":
    main()
