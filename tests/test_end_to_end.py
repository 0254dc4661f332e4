"""The user's path through the CLI, in subprocesses: fit the demo config, then test base and SFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

VLM_POST = str(Path(sys.executable).parent / "vlm_post")


def vlm_post(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([VLM_POST, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fit_select_best_export_then_test(tiny_model, demo_data, tmp_path):
    run = tmp_path / "sft"
    # The demo config itself, pointed at this test's model, data and run folder.
    config = yaml.safe_load((ROOT / "configs/demo/sft.yaml").read_text())
    config["model"]["init_args"]["model_name_or_path"] = str(tiny_model)
    config["data"]["train"]["path"] = str(demo_data / "train.parquet")
    config["data"]["val"][0]["path"] = str(demo_data / "validation.parquet")
    config["trainer"].update(default_root_dir=str(run), max_steps=120, val_check_interval=60, log_every_n_steps=5)
    # A fast lr: in 120 steps the model learns to sample the answer format (the demo is tuned for longer runs).
    config["model"]["init_args"]["optim"]["lr"] = 1e-3
    # checkpoints/, lightning_logs/ and export/ follow default_root_dir
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    vlm_post("fit", "--config", str(tmp_path / "sft.yaml"))
    provenance = json.loads((run / "export" / "vlm_post_export.json").read_text())
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2, checkpoints
    assert provenance["monitor"] == "val/demo_val/accuracy" and Path(provenance["weights"]).name in checkpoints
    assert list(run.rglob("events.out.tfevents.*")), "no TensorBoard logs"

    summaries = {}
    for label, extra in (("base", []), ("sft", [f"--model.init_args.init_from={run / 'export'}"])):
        out = tmp_path / "eval" / label
        result = vlm_post(
            "test", "--config", "configs/demo/eval.yaml", *extra,
            f"--model.init_args.model_name_or_path={tiny_model}",
            f"--data.test=[{{name: demo_test, path: {demo_data / 'test.parquet'}}}]",
            f"--model.init_args.eval.output_dir={out}",
        )  # fmt: skip
        assert "demo_test" in result.stdout
        summaries[label] = json.loads((out / "summary.json").read_text())["results"][0]
        records = [json.loads(line) for line in (out / "demo_test.jsonl").read_text().splitlines()]
        assert len(records) == 16 and {"id", "responses", "extracted", "correct"} <= set(records[0])
    # --ckpt_path: the command line's evaluation protocol wins over the checkpoint's saved hyperparameters.
    by_checkpoint = tmp_path / "eval" / "by_checkpoint"
    vlm_post(
        "test", "--config", "configs/demo/eval.yaml", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"--model.init_args.model_name_or_path={tiny_model}",
        f"--data.test=[{{name: demo_test, path: {demo_data / 'test.parquet'}}}]",
        f"--model.init_args.eval.output_dir={by_checkpoint}", "--model.init_args.eval.n=2",
    )  # fmt: skip
    assert json.loads((by_checkpoint / "summary.json").read_text())["eval"]["n"] == 2

    predictions = tmp_path / "predict"
    vlm_post(
        "predict", "--config", "configs/demo/eval.yaml",
        f"--model.init_args.model_name_or_path={tiny_model}",
        f"--model.init_args.init_from={run / 'export'}",
        f"--data.test=[{{name: demo_test, path: {demo_data / 'test.parquet'}}}]",
        f"--model.init_args.eval.output_dir={predictions}",
    )  # fmt: skip
    rows = [json.loads(line) for line in (predictions / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(row["responses"]) == 16 for row in rows)

    assert summaries["base"]["accuracy"] == 0.0
    assert summaries["sft"]["accuracy"] >= summaries["base"]["accuracy"] + 0.2
    sft = summaries["sft"]
    assert sft["format_rate"] > summaries["base"]["format_rate"] + 0.5, (sft["format_rate"], sft["mean_accuracy"])
    assert {"pass@16", "entropy", "mean_distinct_answers", "ci"} <= set(summaries["sft"])
