"""bench/ at tiny size: each script's measuring function runs once on the project's public API, so a refactor that
breaks a benchmark (or leaves one of its timers unfired) fails here, not at the next benchmark run.

TRL's sides are not run: TRL is a bench extra, never installed with the project.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def _work(tmp_path: Path, links: dict[str, Path]) -> Path:
    """A bench work folder: the tiny models and data under the names the scripts read."""
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    return tmp_path


def _timed_steps(result: dict, keys: tuple[str, ...]) -> list[dict]:
    steps = result["steps"]
    assert len(steps) == 2  # one warm-up, one timed
    for step in steps:
        fired = {key: step.get(key, 0.0) for key in keys}
        assert all(value > 0 for value in fired.values()), fired
        assert step["prompt_tokens"] > 0 and step["generated_tokens"] > 0
    return steps


def test_rl_step_times_ours(tiny_model, demo_data, tmp_path):
    import rl_step

    args = rl_step.parse_args(["--steps=1", "--warmup=1", "--prompts=2", "--n=2", "--max-new-tokens=4"])
    work = _work(tmp_path, {"tiny-qwen2.5-vl": tiny_model, "demo-data": demo_data})
    result = rl_step.run_ours(args, work)
    _timed_steps(result, ("generate", "head", "reward", "model_train", "model_gen", "backward", "optim"))


def test_opd_step_times_ours(tiny_model, demo_data, tmp_path):
    import opd_step

    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    teacher = build_tiny_qwen2_5_vl(tmp_path / "built-teacher", **opd_step.TEACHER)
    args = opd_step.parse_args(["--steps=1", "--warmup=1", "--prompts=2", "--n=2", "--max-new-tokens=4", "--top-k=4"])
    work = _work(tmp_path, {"student": tiny_model, "teacher": teacher, "demo-data": demo_data})
    result = opd_step.run_ours(args, work)
    _timed_steps(result, ("generate", "teacher", "teacher_head", "teacher_model", "loss", "model_train", "optim"))


@pytest.mark.parametrize("module", ["sft", "rl", "opd"])
def test_memory_measures_ours_and_the_naive_baseline(module, tmp_path, monkeypatch):
    import memory

    monkeypatch.setattr(
        sys, "argv", ["memory.py", "--sizes=tiny", f"--modules={module}", "--seq-len=64", "--sft-rows=2",
                      "--prompts=1", "--n=2", "--max-new-tokens=4"]
    )  # fmt: skip
    args = memory.parse_args()
    memory.prepare(args, tmp_path)
    for method in memory.METHODS:
        result = memory.measure(args, tmp_path, "tiny", module, method)
        assert result["peak_bytes"] > 0 and result["time_s"] > 0, (method, result)


def test_gpu_step_times_the_rl_engine_and_reward_on_the_cpu(tiny_model, demo_data, tmp_path):
    """bench/gpu_step.py's RL instrumentation (bench/_gpu_lightning.py) under a CPU trainer: every figure of the
    FLOP model is filled in from the rollout batch, and generation and reward are timed."""
    import lightning as L
    from _gpu_lightning import make_timer, timed_rl_module

    from tests.helpers import demo_datamodule
    from vlm_post.losses import GRPOLossConfig
    from vlm_post.modules import EvalConfig
    from vlm_post.rollout import SamplingParams

    timer = make_timer("rl", warmup=1, image_token_id=0)
    module = timed_rl_module(
        timer,
        model_name_or_path=str(tiny_model),
        eval=EvalConfig(n=0, max_new_tokens=4),
        rollout=SamplingParams(n=2, temperature=1.0, max_new_tokens=4),
        loss=GRPOLossConfig(kl_mode="off"),
    )
    L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=str(tmp_path),
    ).fit(module, demo_datamodule(demo_data, batch_size=2))  # fmt: skip
    assert len(timer.steps) == 2
    for step in timer.steps:
        assert step["gen_s"] > 0 and step["reward_s"] > 0, step
        assert step["rows"] == 4 and len(step["prompt_lens"]) == 4 and len(step["response_lens"]) == 4
        assert len(step["grids"]) == 4  # each demo prompt has one image, once per sample
        assert step["prefill_lens"] and step["prefill_grids"]
