"""Exact resume: an RL run killed with SIGKILL and resumed from its last checkpoint ends with the same weights
as an uninterrupted run (CPU, fixed seed): optimizer, scheduler, step, RNG and data position all come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

VLM_POST = str(Path(sys.executable).parent / "vlm_post")


class KillAtStep(Callback):
    """Kill the whole process, as an out-of-memory killer or a pre-empted node would: no cleanup runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _config(tmp_path: Path, tiny_model: Path, demo_data: Path, run: str, kill_at: int | None) -> Path:
    config = yaml.safe_load((ROOT / "configs/demo/rl.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(tmp_path / run), max_steps=6, limit_val_batches=0, log_every_n_steps=1)
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1},
        }
    ]
    if kill_at is not None:
        trainer["callbacks"].append({"class_path": "tests.test_resume.KillAtStep", "init_args": {"step": kill_at}})
    model = config["model"]["init_args"]
    # A reward the random tiny policy earns, so that every step moves the weights (all-zero rewards would not).
    model.update(
        model_name_or_path=str(tiny_model), init_from=None, micro_batch_size=8, reward="tests.test_rl.length_reward"
    )
    model["rollout"].update(n=4, max_new_tokens=8)
    config["data"].update(batch_size=4, val=[])
    config["data"]["train"]["path"] = str(demo_data / "train.parquet")
    config["export"] = {"enabled": False}
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [VLM_POST, "fit", "--config", str(config), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _policy(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model, demo_data, tmp_path):
    straight = _fit(_config(tmp_path, tiny_model, demo_data, "straight", None))
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = _fit(_config(tmp_path, tiny_model, demo_data, "killed", kill_at=3))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2

    resumed = _fit(_config(tmp_path, tiny_model, demo_data, "killed", None), f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = _policy(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    got = _policy(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    initial = _policy(tmp_path / "straight" / "checkpoints" / "epoch=0-step=2.ckpt")
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "the weights did not move: vacuous test"
    mismatched = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
