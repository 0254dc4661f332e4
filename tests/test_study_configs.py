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


def test_a_stage_can_start_vllm_servers_beside_its_trainer(tmp_path):
    """Server mode in the SLURM plan: the RL stages ask for 2 server nodes beside their trainer node. The dry run
    shows the job (3 nodes), the servers started by docs/rollout.md's command on the job's last 2 nodes, and the
    trainer on the first given their addresses; the job script is valid bash."""
    study = yaml.safe_load((ROOT / "configs/study/geo3k_qwen2_5_vl_7b.yaml").read_text())
    servers = {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "nodes": 2, "args": ["--tensor-parallel-size", "8"]}
    for arm in study["arms"]:
        arm["stages"][-1]["slurm"] = {"vllm_servers": servers}
    study["study_dir"] = str(tmp_path / "study")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    result = subprocess.run([sys.executable, "-m", "vlm_post", "study", "--config", str(path), "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rl = result.stdout[result.stdout.index("opd/seed0/rl (") :]
    rl = rl[: rl.index("\n[")]
    assert "--nodes=3 --ntasks-per-node=8 --gpus-per-node=8" in rl
    serve = (f"VLLM_SERVER_DEV_MODE=1 srun --nodes=1 --ntasks=1 --gpus-per-task=8 --nodelist=\"$node\" "
             f"--output={tmp_path / 'study/opd/seed0/rl/vllm_server'}_%N.log {sys.executable} -m "
             "vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-VL-7B-Instruct --port 8000 --logprobs-mode "
             "processed_logprobs --generation-config vllm --trust-request-chat-template --tensor-parallel-size 8 &")  # fmt: skip
    assert serve in rl, rl
    assert 'for node in "${nodes[@]:1}"; do' in rl
    trainer = f'srun --nodes=1 --nodelist="$trainer_nodes" {sys.executable} -m vlm_post fit --config configs/geo3k/rl'
    assert trainer in rl and rl.count('"--model.init_args.vllm.server_urls=[$server_urls]"') == 1, rl
    sft = result.stdout[result.stdout.index("sft_early/seed0/sft (") :]
    assert "vllm.entrypoints" not in sft[: sft.index("\n[")], "only the stages that ask for servers start them"

    from vlm_post.study import build_plan, load_study
    from vlm_post.study.launch import job_script

    plan = build_plan(load_study(str(path)))
    script = tmp_path / "job.sbatch"
    script.write_text(job_script(plan.by_key()["opd/seed0/rl"], load_study(str(path)).launcher))
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
