"""Every study config in configs/study parses, plans, and each of its stage commands parses as vlm_post would run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from vlm_post.study import build_plan, load_study

pytestmark = pytest.mark.slow

STUDIES = sorted((ROOT / "configs" / "study").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_config_plans_and_its_stage_commands_parse(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(path)
    plan = build_plan(study)
    assert len(plan.arms) == 3 and all(stage.key.count("/") <= 2 for stage in plan.stages)
    # One stage of each distinct stage config and overrides (and one evaluation), parsed by the real CLI.
    seed = study.seeds[0]
    distinct = {
        (stage.config, *stage.overrides): f"{arm.name}/seed{seed}/{stage.name}"
        for arm in study.arms
        for stage in arm.stages
    }
    keys = [*distinct.values(), *[s.key for s in plan.stages if s.key.startswith("shared/")]]
    keys.append(f"{study.arms[0].name}/seed{seed}/eval_end")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in keys:
        stage = plan.by_key()[key]
        result = subprocess.run([sys.executable, "-m", "vlm_post", *stage.argv(), "--print_config"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, f"{key}: {result.stderr[-2000:]}"
        config = yaml.safe_load(result.stdout)
        assert config["trainer"]["default_root_dir"] == stage.run_dir
        handoff = [a.split("=", 1)[1] for a in stage.arguments if a.startswith("--model.init_args.init_from=")]
        assert config["model"]["init_args"].get("init_from") == (handoff[0] if handoff else None), key


def test_real_size_study_dry_run_prints_its_slurm_plan():
    result = subprocess.run([sys.executable, "-m", "vlm_post", "study", "--config", "configs/study/geo3k_qwen2_5_vl_7b.yaml",
                             "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "launcher slurm" in out and "sbatch --dependency=afterok:<sft_early/seed2/sft>" in out
    assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in out  # the OPD stage's two nodes
    # the exact command the job runs: the launcher's python (unset: the one running the study), not a guess
    assert f"srun {sys.executable} -m vlm_post fit --config configs/geo3k/rl_qwen2_5_vl_7b.yaml" in out
    assert f"every command runs in {ROOT}" in out
    assert out.count("eval_step_") >= 3 * 3 * 5  # every 40 of 240 RL steps, per arm and seed
