"""The ``slurm`` launcher against a real one-node SLURM (tests/slurm_cluster.py), not a mock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import slurm_cluster
from tests.conftest import ROOT
from tests.study_fixtures import tiny_study

VLM_POST = str(Path(sys.executable).parent / "vlm_post")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(slurm_cluster.missing()) or os.geteuid() != 0,
        reason=f"needs root and SLURM's daemons and clients (apt-get install slurm-wlm munge; missing: {slurm_cluster.missing()})",
    ),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield running
    running.stop()


def test_slurm_study_chains_jobs_with_afterok_and_reports(cluster, tiny_model, demo_data, tmp_path):
    launcher = {"kind": "slurm", "python": sys.executable, "wait": True, "poll_s": 1.0,
                "slurm": {"cpus_per_task": 1, "time": "30:00"}}  # fmt: skip
    path = tiny_study(tiny_model, demo_data, tmp_path / "configs", tmp_path / "study", **launcher)
    config = yaml.safe_load(path.read_text())
    config["evaluation"].pop("every_k_steps")
    config["arms"][0]["stages"][1]["slurm"] = {"extra": ["--comment=rl-stage"]}
    path.write_text(yaml.safe_dump(config))
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}

    plan = subprocess.run([VLM_POST, "study", "--config", str(path), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert (
        f"sbatch --dependency=afterok:<short/seed0/sft> {tmp_path / 'study/short/seed0/rl'}/job.sbatch" in plan.stdout
    )
    assert "--nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=30:00 --comment=rl-stage" in plan.stdout

    result = subprocess.run([VLM_POST, "study", "--config", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {entry["stage"]: entry for entry in json.loads((tmp_path / "study/slurm_jobs.json").read_text())}
    assert set(jobs) == {"base/eval", "report"} | {f"{a}/seed0/{s}" for a in ("short", "long")
                                                   for s in ("sft", "rl", "eval_entry", "eval_end")}  # fmt: skip
    for stage, parent in (("long/seed0/rl", "long/seed0/sft"), ("long/seed0/eval_end", "long/seed0/rl"),
                          ("short/seed0/eval_entry", "short/seed0/sft")):  # fmt: skip
        assert f"--dependency=afterok:{jobs[parent]['job']}" in jobs[stage]["command"], jobs[stage]
    assert not any("--dependency" in arg for arg in jobs["base/eval"]["command"])
    assert "--dependency=afterany:" in " ".join(jobs["report"]["command"])
    for stage in set(jobs) - {"report"}:
        marker = json.loads((tmp_path / "study" / stage / "vlm_post_stage.json").read_text())
        assert marker["slurm_job"] == jobs[stage]["job"], marker
        log = (tmp_path / "study" / stage / "stage.log").read_text()
        assert f"job {jobs[stage]['job']}: {stage}" in log
    rows = json.loads((tmp_path / "study/results.json").read_text())
    assert {(r["arm"], r["point"]) for r in rows} == {("base", "entry")} | {
        (a, p) for a in ("short", "long") for p in ("entry", "end")
    }
    assert (tmp_path / "study/report.log").is_file()  # the report job ran after the stages

    again = subprocess.run([VLM_POST, "study", "--config", str(path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stdout[-2000:]
