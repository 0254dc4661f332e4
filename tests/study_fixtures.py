"""A tiny two-arm study for the tests: the demo's stage configs, pointed at a tiny model and data, a few steps each."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import ROOT


def _stage_config(name: str, tiny_model: Path, demo_data: Path, out: Path, **trainer) -> str:
    config = yaml.safe_load((ROOT / "configs" / "demo" / f"{name}.yaml").read_text())
    config["model"]["init_args"]["model_name_or_path"] = str(tiny_model)
    if "train" in config["data"]:
        config["data"]["train"]["path"] = str(demo_data / "train.parquet")
        config["data"]["val"] = [{"name": "demo_val", "path": str(demo_data / "validation.parquet"), "limit": 8}]
    config["trainer"].update(trainer)
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [c for c in callbacks if "EarlyStopping" not in c["class_path"]]
    init_args = config["model"]["init_args"]
    for key in ("val", "eval"):
        if key in init_args:
            init_args[key]["max_new_tokens"] = 8
    if "rollout" in init_args:
        init_args["rollout"].update(n=2, max_new_tokens=8)
        init_args["micro_batch_size"] = 8
    config["data"]["batch_size"] = 4
    if name == "sft":
        config["model"]["init_args"]["optim"]["lr"] = 5e-3  # a few steps learn the answer format
        config["export"] = {"weights": "last"}  # the arms' exports differ (the best could be the same early step)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def tiny_study(tiny_model: Path, demo_data: Path, out: Path, study_dir: Path, **launcher) -> Path:
    """Arms ``short`` (SFT 8 steps) and ``long`` (SFT 24 steps), each then 4 GRPO steps; evaluation every 2 RL steps."""
    out.mkdir(parents=True, exist_ok=True)
    sft = _stage_config("sft", tiny_model, demo_data, out, max_steps=24, val_check_interval=8, log_every_n_steps=1)
    rl = _stage_config("rl", tiny_model, demo_data, out, max_steps=4, val_check_interval=2, log_every_n_steps=1)
    evaluation = _stage_config("eval", tiny_model, demo_data, out)
    study = {
        "study_dir": str(study_dir),
        "arms": [
            {
                "name": "short",
                "stages": [
                    {"name": "sft", "config": sft, "overrides": ["trainer.max_steps=8"]},
                    {"name": "rl", "config": rl},
                ],
            },
            {"name": "long", "stages": [{"name": "sft", "config": sft}, {"name": "rl", "config": rl}]},
        ],
        "evaluation": {
            "config": evaluation,
            "datasets": [
                {"name": "demo_test", "path": str(demo_data / "test.parquet")},
                {"name": "demo_shifted", "path": str(demo_data / "validation.parquet"), "domain": "out", "limit": 8},
            ],
            "n": 4,
            "bootstrap_resamples": 200,
            "every_k_steps": 2,
        },
        "launcher": launcher or {"kind": "local"},
    }
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path
