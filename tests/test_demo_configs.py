"""Every stage config in configs/demo runs as the README shows it, for two steps each.

Run from the repository's root as a user would, in a subprocess of the console script, against the demo's
artifacts (`make test` builds them). The stage outputs a config names (the teacher's and the SFT's exports, which
`make demo` leaves under runs/study/demo) are made the same way first, by two-step runs of the configs that write
them, and passed with the override the config's header shows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

DEMO = ROOT / "configs" / "demo"
VLM_POST = str(Path(sys.executable).parent / "vlm_post")


def run(subcommand: str, config: str, root: Path, *overrides: str) -> Path:
    """``vlm_post <subcommand> --config configs/demo/<config>`` for two steps, into ``root``; its export folder."""
    command = [VLM_POST, subcommand, "--config", f"configs/demo/{config}", f"--trainer.default_root_dir={root}"]
    if subcommand == "fit":
        command += ["--trainer.max_steps=2", f"--export.dirpath={root / 'export'}"]
    else:
        command += ["--trainer.limit_test_batches=1", f"--model.init_args.eval.output_dir={root / 'eval'}"]
    result = subprocess.run([*command, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{config}: {result.stderr[-3000:]}"
    return root / "export"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """The stage outputs the other configs name: the teacher's export and an SFT export."""
    root = tmp_path_factory.mktemp("demo_outputs")
    return {"teacher": run("fit", "teacher_sft.yaml", root / "teacher"), "sft": run("fit", "sft.yaml", root / "sft")}


RUNS = {
    "teacher_sft.yaml": lambda outputs: ("fit", []),
    "sft.yaml": lambda outputs: ("fit", []),
    "sft_overtrained.yaml": lambda outputs: ("fit", []),
    "sft_fsdp.yaml": lambda outputs: ("fit", []),
    "opd.yaml": lambda outputs: ("fit", [f"--model.init_args.teacher.model_name_or_path={outputs['teacher']}"]),
    "rl.yaml": lambda outputs: ("fit", [f"--model.init_args.init_from={outputs['sft']}"]),
    "eval.yaml": lambda outputs: ("test", [f"--model.init_args.init_from={outputs['sft']}"]),
    "eval_ood.yaml": lambda outputs: ("test", [f"--model.init_args.init_from={outputs['sft']}"]),
}


def test_every_demo_config_is_run_here():
    assert sorted(RUNS) == sorted(p.name for p in DEMO.glob("*.yaml"))


@pytest.mark.parametrize("config", sorted(RUNS))
def test_a_demo_config_runs_two_steps(config, outputs, tmp_path):
    subcommand, overrides = RUNS[config](outputs)
    extra = [f"--model.init_args.teacher.cache_dir={tmp_path / 'cache'}"] if config == "opd.yaml" else []
    export = run(subcommand, config, tmp_path / "run", *overrides, *extra)
    if subcommand == "fit":
        assert (export / "config.json").is_file(), f"{config} wrote no export"
    else:
        assert (tmp_path / "run" / "eval" / "summary.json").is_file()
