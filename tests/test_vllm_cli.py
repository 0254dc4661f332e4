"""``vlm_post test`` with ``eval.engine: vllm`` against ``engine: hf``, through the CLI, as a user runs it.

Both runs evaluate the same weights (an ``init_from`` export, unlike the model folder's) on the demo's test split,
images included: the greedy answers, their grades and the greedy accuracy must be the same problem by problem.
Runs in .venv-vllm (``make test-vllm``); the main suite skips it where vLLM is not importable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: make test-vllm runs these in .venv-vllm")

from tests.conftest import ROOT  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLM_POST = str(Path(sys.executable).parent / "vlm_post")
CPU_ENGINE = [
    "--model.init_args.vllm.dtype=float32",
    "--model.init_args.vllm.gpu_memory_utilization=0.3",
    "--model.init_args.vllm.max_model_len=1024",
]


@pytest.fixture(scope="module")
def head64_export(tmp_path_factory):
    """A tiny Qwen2.5-VL vLLM's CPU attention takes (head_dim 64), and an export of other weights for init_from."""
    from vlm_post.models.loading import load_policy, load_processor
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("vllm_cli")
    model = build_tiny_qwen2_5_vl(root / "tiny-head64", hidden_size=256)
    policy = load_policy(str(model))
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    export = root / "export"
    policy.save_pretrained(export)
    load_processor(str(model)).save_pretrained(export)
    return model, export


def _test(engine: str, model: Path, export: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        VLM_POST, "test", "--config", "configs/demo/eval.yaml",
        f"--model.init_args.model_name_or_path={model}", f"--model.init_args.init_from={export}",
        f"--data.test=[{{name: demo_test, kind: geometry3k, path: {data / 'test.parquet'}}}]",
        f"--model.init_args.eval.engine={engine}", "--model.init_args.eval.n=4",
        f"--model.init_args.eval.output_dir={out}", f"--trainer.default_root_dir={out}",
        "--model.init_args.eval.bootstrap_resamples=200", *CPU_ENGINE, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "demo_test.jsonl").read_text().splitlines()]


def test_vllm_and_hf_give_the_same_greedy_answers_problem_by_problem(head64_export, demo_data, tmp_path):
    model, export = head64_export
    runs = {}
    for engine in ("hf", "vllm"):
        result = _test(engine, model, export, demo_data, tmp_path / engine)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[engine] = (_rows(tmp_path / engine), json.loads((tmp_path / engine / "summary.json").read_text()))
    (hf_rows, hf_summary), (vllm_rows, vllm_summary) = runs["hf"], runs["vllm"]
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows] and len(hf_rows) == 16
    differ = [r["id"] for r, h in zip(vllm_rows, hf_rows) if r["greedy_response"] != h["greedy_response"]]
    assert not differ, f"{len(differ)} of 16 greedy answers differ between the engines: {differ}"
    assert [r["greedy_correct"] for r in vllm_rows] == [r["greedy_correct"] for r in hf_rows]
    hf_result, vllm_result = hf_summary["results"][0], vllm_summary["results"][0]
    assert vllm_result["accuracy"] == hf_result["accuracy"]
    assert vllm_summary["eval"]["engine"] == "vllm" and vllm_summary["model"] == str(export)
    # The samples are the engine's own draws; their shape and the entropy pass over them are the same protocol.
    for row in vllm_rows:
        assert len(row["responses"]) == 4 and all(0 < length <= 16 for length in row["response_lengths"])
        assert row["mean_token_entropy"] is not None and row["mean_token_entropy"] > 0


@pytest.mark.parametrize(
    "setting, reason",
    [
        ("max_model_len=8192", "max_model_len"),  # the tiny model allows 4,096 positions
        ("enable_sleep_mode=true", "Sleep mode is not supported"),  # CUDA only
    ],
)
def test_an_engine_vllm_cannot_build_is_one_line_naming_the_model(head64_export, demo_data, tmp_path, setting, reason):
    """Settings vLLM refuses for this model or this machine: one line naming the model and vLLM's reason."""
    model, export = head64_export
    result = _test("vllm", model, export, demo_data, tmp_path, f"--model.init_args.vllm.{setting}")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vlm_post: error: vLLM cannot load the model") and str(model) in last, last
    assert reason in last, last
    assert "Traceback" not in result.stderr


def test_a_study_whose_evaluations_use_vllm_runs_end_to_end(head64_export, demo_data, tmp_path):
    """The tests' tiny study (one arm: SFT, then GRPO) with every evaluation stage on engine: vllm, then its report."""
    import yaml

    from tests.study_fixtures import tiny_study

    model, _ = head64_export
    path = tiny_study(model, demo_data, tmp_path / "configs", tmp_path / "study")
    study = yaml.safe_load(path.read_text())
    study["arms"] = study["arms"][:1]
    study["evaluation"]["overrides"] = ["--model.init_args.eval.engine=vllm", *CPU_ENGINE]
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([VLM_POST, "study", "--config", str(path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "study").rglob("summary.json")]
    # base, and the arm at entry, step_2 and end
    assert len(summaries) == 4 and all(s["eval"]["engine"] == "vllm" for s in summaries)
    rows = json.loads((tmp_path / "study" / "results.json").read_text())
    assert {(r["arm"], r["point"]) for r in rows} == {
        ("base", "entry"),
        *(("short", p) for p in ("entry", "step_2", "end")),
    }
    assert all(r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"] and r["entropy"] > 0 for r in rows)
    assert "| short |" in (tmp_path / "study" / "results.md").read_text()


def test_validation_inside_fit_with_vllm_sees_the_trained_weights(head64_export, demo_data, tmp_path):
    """SFT with val.engine hf, then vllm: the same greedy validation metrics at every check. The SFT learns the answer
    format within its 8 steps, so an engine left on the starting weights (no sync after training) would differ."""
    from vlm_post.study.curves import scalars

    model, _ = head64_export
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    curves = {}
    for engine in ("hf", "vllm"):
        run = tmp_path / engine
        command = [
            VLM_POST, "fit", "--config", "configs/demo/sft.yaml", f"--model.init_args.model_name_or_path={model}",
            f"--data.train.path={demo_data / 'train.parquet'}",
            f"--data.val=[{{name: demo_val, path: {demo_data / 'validation.parquet'}, limit: 8}}]",
            "--data.batch_size=4", "--model.init_args.optim.lr=5e-3", "--trainer.max_steps=8",
            "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={run}",
            f"--model.init_args.val.engine={engine}", *CPU_ENGINE,
        ]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        curves[engine] = {k: v for k, v in scalars(run).items() if k.startswith("val/demo_val/")}
    hf, vllm = curves["hf"], curves["vllm"]
    assert [step for step, _ in hf["val/demo_val/accuracy"]] == [3, 7]  # two checks, after 4 and 8 steps
    assert hf["val/demo_val/format_rate"][-1][1] > 0, "8 steps did not change the answers: the test would not see it"
    assert vllm == hf
