"""Bad configuration ends in one short message naming the culprit, exit status 2, and no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vlm_post.cli import main

DEMO = "configs/demo/sft.yaml"


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlm_post"])  # as from the console script, not pytest's argv


def run_main(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert err.startswith("vlm_post: error:")
    assert len(err.strip().splitlines()) <= 3, err
    return err


@pytest.fixture
def demo_overrides(tiny_model, demo_data, tmp_path):
    return [
        f"--model.init_args.model_name_or_path={tiny_model}",
        f"--data.train.path={demo_data / 'train.parquet'}",
        f"--data.val=[{{name: demo_val, path: {demo_data / 'validation.parquet'}}}]",
        f"--trainer.default_root_dir={tmp_path}",
    ]


@pytest.mark.fast
def test_unknown_key(capsys):
    err = run_main(["fit", "--config", DEMO, "--trainer.bogus_knob", "3"], capsys)
    assert "bogus_knob" in err


@pytest.mark.fast
@pytest.mark.parametrize(
    ("config", "override", "writer"),
    [
        (
            "configs/demo/rl.yaml",
            "--model.init_args.init_from=runs/demo/sft/no-such-export",
            "'vlm_post fit --config configs/demo/sft.yaml': run it first",
        ),
        (
            "configs/demo/opd.yaml",
            "--model.init_args.teacher.model_name_or_path=runs/study/demo/shared/no-such-teacher/export",
            "'vlm_post study --config configs/study/demo.yaml (make demo runs it)': run it first",
        ),
    ],
)
def test_a_missing_stage_output_names_the_command_that_writes_it(config, override, writer, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = run_main(["fit", "--config", config, override], capsys)
    assert "not found" in err and writer in err, err


@pytest.mark.fast
@pytest.mark.parametrize("config", ["configs/demo/rl.yaml", "configs/demo/opd.yaml"])
def test_a_renamed_option_names_the_new_one(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = run_main(["fit", "--config", config, "--model.init_args.ppo_epochs", "2"], capsys)
    assert "model.init_args.ppo_epochs: renamed, use model.init_args.epochs" in err


@pytest.mark.fast
def test_a_config_file_with_a_renamed_option_names_the_new_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = Path("configs/demo/rl.yaml").read_text()
    assert "    epochs: 1\n" in text
    old_config = tmp_path / "old_rl.yaml"  # an RL config file written before the rename
    old_config.write_text(text.replace("    epochs: 1\n", "    ppo_epochs: 1\n"))
    err = run_main(["fit", "--config", str(old_config)], capsys)
    assert "model.init_args.ppo_epochs: renamed, use model.init_args.epochs" in err


@pytest.mark.fast
def test_wrong_type(capsys):
    err = run_main(["fit", "--config", DEMO, "--data.batch_size", "many"], capsys)
    assert "data.batch_size" in err and "many" in err


@pytest.mark.fast
def test_unknown_module_key(capsys):
    err = run_main(["fit", "--config", DEMO, "--model.init_args.learning_rate", "3"], capsys)
    assert "learning_rate" in err


@pytest.mark.fast
def test_nested_culprit_is_named_by_its_full_key(capsys, tmp_path):
    """jsonargparse reports a bad value under ``model`` as a tree of Union attempts; the message is its bottom."""
    err = run_main(["fit", "--config", DEMO, "--model.init_args.optim.lr", "fast"], capsys)
    assert err.startswith(
        "vlm_post: error: model.init_args.optim.lr: Not of type NonNegativeFloat: could not convert string to float: 'fast'\n"
    ), err
    config = (ROOT / DEMO).read_text()
    (tmp_path / "typo.yaml").write_text(re.sub(r"^(\s+)lr: ", r"\1lrr: ", config, count=1, flags=re.MULTILINE))
    err = run_main(["fit", "--config", str(tmp_path / "typo.yaml")], capsys)
    assert err.startswith("vlm_post: error: model.init_args.optim: Option 'lrr' is not accepted\n"), err
    (tmp_path / "class.yaml").write_text(config.replace("vlm_post.modules.SFTModule", "vlm_post.modules.SFTModul"))
    err = run_main(["fit", "--config", str(tmp_path / "class.yaml")], capsys)
    assert err.startswith("vlm_post: error: model.class_path: ") and "SFTModul" in err, err


@pytest.mark.fast
def test_missing_config_file(capsys):
    err = run_main(["fit", "--config", "configs/demo/no_such.yaml"], capsys)
    assert "no_such.yaml" in err


@pytest.mark.fast
def test_unresolvable_model_offline(capsys, demo_overrides):
    started = time.time()
    err = run_main(
        ["fit", "--config", DEMO, *demo_overrides, "--model.init_args.model_name_or_path=Qwen/No-Such-VL-7B"], capsys
    )
    assert "Qwen/No-Such-VL-7B" in err and "offline" in err
    assert time.time() - started < 30


@pytest.mark.fast
def test_missing_model_folder(capsys, demo_overrides):
    err = run_main(
        ["fit", "--config", DEMO, *demo_overrides, "--model.init_args.model_name_or_path=./nowhere/model"], capsys
    )
    assert "./nowhere/model" in err


@pytest.mark.fast
def test_missing_data_file(capsys, demo_overrides, monkeypatch):
    loaded = []
    from vlm_post.modules import base

    monkeypatch.setattr(base, "load_policy", lambda *a, **k: loaded.append(a))
    err = run_main(["fit", "--config", DEMO, *demo_overrides, "--data.train.path=missing/train.parquet"], capsys)
    assert "missing/train.parquet" in err and "demo_train" in err
    assert not loaded, "the model was loaded before the data error"


@pytest.mark.fast
def test_missing_init_from(capsys, demo_overrides):
    err = run_main(["fit", "--config", DEMO, *demo_overrides, "--model.init_args.init_from=runs/none/export"], capsys)
    assert "runs/none/export" in err


@pytest.mark.slow
def test_console_script_help():
    script = Path(sys.executable).parent / "vlm_post"
    command = [str(script), "fit", "--model.help", "vlm_post.modules.SFTModule"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model.init_from" in result.stdout and "weights only" in result.stdout


@pytest.mark.fast
def test_rl_help_lists_every_loss_option_with_its_default(capsys):
    import dataclasses

    from vlm_post.losses import GRPOLossConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "vlm_post.modules.RLModule"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    # each option's entry: from its line to the next option's
    entries = {
        m[1]: m[2] for m in re.finditer(r"^  --model\.loss\.(\w+) (.*?)(?=^  --)", out, re.MULTILINE | re.DOTALL)
    }
    for field in dataclasses.fields(GRPOLossConfig):
        if field.name != "rollout_correction":  # a group: its own options, below
            assert "default:" in entries.get(field.name, ""), field.name
    for option in ("rollout_correction.mode", "entropy_control", "top_entropy_quantile", "advantage_estimator"):
        assert f"--model.loss.{option}" in out
    assert re.search(r"--model\.entropy_threshold ENTROPY_THRESHOLD", out)


@pytest.mark.fast
def test_help_lists_every_subcommand_with_study(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    listed = re.findall(r"^    (\w+) ", out, re.MULTILINE)
    assert listed == ["fit", "validate", "test", "predict", "study"], out
    assert re.search(r"study +Runs a whole warm-start study", out)


@pytest.mark.fast
def test_default_precision_is_fp32_without_a_bf16_gpu():
    import torch

    from vlm_post.cli import default_precision

    assert default_precision("cpu") == "32-true"
    expected = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert default_precision("auto") == expected


@pytest.mark.fast
def test_sharded_checkpoint_under_another_strategy(capsys, demo_overrides, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"  # what ModelParallelStrategy writes: a folder of shards plus .metadata
    dcp.save({"state_dict": {"policy.lm_head.weight": torch.zeros(2, 2)}}, checkpoint_id=folder, no_dist=True)
    err = run_main(["fit", "--config", DEMO, *demo_overrides, f"--ckpt_path={folder}"], capsys)
    assert "sharded checkpoint folder (FSDP2" in err and "init_from" in err and str(folder) in err
    (folder / ".metadata").write_bytes(b"")  # a truncated copy
    err = run_main(["fit", "--config", DEMO, *demo_overrides, f"--ckpt_path={folder}"], capsys)
    assert f"sharded checkpoint folder {folder}: cannot read its .metadata" in err


@pytest.mark.fast
def test_missing_demo_artifacts_name_the_command_that_builds_them(capsys, demo_overrides):
    """A fresh clone's first command, before 'make demo': the message says what builds the demo's models and data."""
    model = run_main(
        ["fit", "--config", DEMO, *demo_overrides, "--model.init_args.model_name_or_path=artifacts/no-such-vl"], capsys
    )
    assert "'artifacts/no-such-vl'" in model and "make artifacts" in model, model
    data = run_main(
        ["fit", "--config", DEMO, *demo_overrides, "--data.train.path=artifacts/no-such/train.parquet"], capsys
    )
    assert "artifacts/no-such/train.parquet" in data and "make artifacts" in data, data
    elsewhere = run_main(["fit", "--config", DEMO, *demo_overrides, "--data.train.path=/nowhere/train.parquet"], capsys)
    assert "make artifacts" not in elsewhere  # only the demo's own folder gets the hint


@pytest.mark.fast
@pytest.mark.parametrize(
    ("key", "option"),
    [("trainer.default_root_dir", "--trainer.default_root_dir"), ("export.dirpath", "--export.dirpath"),
     ("model.init_args.eval.output_dir", "--model.init_args.eval.output_dir")],
)  # fmt: skip
def test_output_folder_under_a_file_is_one_line_before_any_weights_load(key, option, capsys, demo_overrides, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    started = time.time()
    err = run_main(["fit", "--config", DEMO, *demo_overrides, f"{option}={blocker / 'run'}"], capsys)
    assert f"{key}: {blocker / 'run'} cannot be made: {blocker} is a file, not a folder" in err, err
    assert time.time() - started < 30 and blocker.read_text() == "not a folder"


@pytest.mark.fast
@pytest.mark.parametrize("key", ["eval", "val", "rollout"])
def test_engine_vllm_without_vllm_names_the_install_command(key, capsys, demo_overrides):
    from vlm_post.rollout.vllm import vllm_available

    if vllm_available():
        pytest.skip("vLLM is importable here: the refusal it tests cannot happen")
    config = {"eval": "configs/demo/eval.yaml", "val": DEMO, "rollout": "configs/demo/rl.yaml"}[key]
    overrides = demo_overrides if key != "eval" else demo_overrides[:1]
    err = run_main(["test" if key == "eval" else "fit", "--config", config, *overrides,
                    f"--model.init_args.{key}.engine=vllm"], capsys)  # fmt: skip
    assert f"{key}.engine: vllm" in err and "pip install 'vlm_post[vllm]'" in err and "make setup-vllm" in err


@pytest.mark.fast
def test_server_mode_needs_no_vllm_in_the_trainers_environment(tiny_model):
    """With ``vllm.server_urls`` the samples come from servers over HTTP: ``engine: vllm`` is accepted where vLLM
    cannot be imported (and refused without ``server_urls``, as above)."""
    from vlm_post.errors import ConfigError
    from vlm_post.modules import EvalConfig, RLModule
    from vlm_post.rollout import SamplingParams
    from vlm_post.rollout.vllm import VLLMConfig, vllm_available

    if vllm_available():
        pytest.skip("vLLM is importable here: the refusal this contrasts with cannot happen")
    engine = SamplingParams(n=2, engine="vllm")
    module = RLModule(str(tiny_model), rollout=engine, eval=EvalConfig(engine="vllm"),
                      vllm=VLLMConfig(server_urls=["http://127.0.0.1:8000"]))  # fmt: skip
    assert module.rollout.engine == module.eval_config.engine == "vllm"
    with pytest.raises(ConfigError, match="rollout.engine: vllm, but vLLM is not installed"):
        RLModule(str(tiny_model), rollout=engine)
