"""Every shipped stage config parses and type-checks (class paths, keys, types), without loading any model.

Study configs (configs/study) are another format: tests/test_study_configs.py parses them.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT
from vlm_post.cli import main

pytestmark = pytest.mark.fast

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "study")


def test_there_are_configs():
    expected = {"configs/demo/sft.yaml", "configs/demo/eval.yaml", "configs/geo3k/sft_qwen2_5_vl_7b.yaml"}
    assert expected | {"configs/geo3k/eval_qwen2_5_vl_7b.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["vlm_post"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    assert "class_path: vlm_post.modules." in captured.out


def test_the_demo_stage_configs_name_the_outputs_make_demo_leaves(monkeypatch):
    """After `make demo` (the demo study), `vlm_post fit --config configs/demo/opd.yaml` and `.../rl.yaml` run as is:
    the teacher and the warm start they name by default are exports the study writes."""
    import yaml

    from vlm_post.study import build_plan, load_study

    monkeypatch.chdir(ROOT)
    plan = build_plan(load_study("configs/study/demo.yaml"))
    exports = {str(stage.run_path.relative_to(ROOT) / "export") for stage in plan.stages if stage.command == "fit"}
    opd = yaml.safe_load((ROOT / "configs/demo/opd.yaml").read_text())["model"]["init_args"]
    rl = yaml.safe_load((ROOT / "configs/demo/rl.yaml").read_text())["model"]["init_args"]
    assert opd["teacher"]["model_name_or_path"] in exports
    assert rl["init_from"] in exports
