"""Multi-process launches the README documents: torchrun, and SLURM's srun (Lightning's own environment detection).

Each starts 2 CPU processes itself, as the launcher would, and runs one step of configs/demo/sft_fsdp.yaml;
Lightning must take the ranks from the launcher (TorchElasticEnvironment, SLURMEnvironment) instead of
spawning processes of its own, and the run must be one 2-rank run: one sharded checkpoint, a shard per rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

VLM_POST = str(Path(sys.executable).parent / "vlm_post")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(tiny_model: Path, demo_data: Path, run: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs/demo/sft_fsdp.yaml").read_text())
    config["model"]["init_args"]["model_name_or_path"] = str(tiny_model)
    config["data"]["train"]["path"] = str(demo_data / "train.parquet")
    config["data"]["val"] = [{"name": "demo_val", "path": str(demo_data / "validation.parquet"), "limit": 4}]
    config["trainer"].update(default_root_dir=str(run), max_steps=1, val_check_interval=1)
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "EarlyStopping" not in c["class_path"]
    ]
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_one_two_rank_run(run: Path, outputs: list[str]) -> None:
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, "\n".join(o[-2000:] for o in outputs)
    assert (run / "export" / "model.safetensors").is_file()


def test_torchrun_launch(tiny_model, demo_data, tmp_path):
    run = tmp_path / "torchrun"
    config = _config(tiny_model, demo_data, run)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               VLM_POST, "fit", "--config", str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    # Two processes in all, ranks 0 and 1 from torchrun (a Lightning launcher of its own would start more).
    assert log.count("Initializing distributed:") == 2 and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    _assert_one_two_rank_run(run, [result.stderr])


def test_slurm_launch(tiny_model, demo_data, tmp_path):
    """What ``srun --ntasks-per-node=2 vlm_post fit ...`` does on one node: start both tasks with SLURM's variables."""
    run = tmp_path / "slurm"
    config = _config(tiny_model, demo_data, run)
    port = str(_free_port())
    processes = []
    for rank in range(2):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_"))},
            "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "vlm_post",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_NODELIST": "127.0.0.1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "MASTER_PORT": port,
        }
        processes.append(
            subprocess.Popen(
                [VLM_POST, "fit", "--config", str(config)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # Each task took its rank from SLURM_PROCID (Lightning's own launcher would make both rank 0 and fork).
    for rank, output in enumerate(outputs):
        assert output.count("Initializing distributed:") == 1, output[-3000:]
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output, output[-3000:]
    _assert_one_two_rank_run(run, outputs)
