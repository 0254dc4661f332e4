"""RL's and OPD's rollouts with vLLM (``rollout.engine: vllm``): the engine samples from the policy's current weights
at every step, given to it in place before each step's sampling.

Runs in .venv-vllm (``make test-vllm``); the main suite skips it where vLLM is not importable. The tiny model has
head_dim 64, which vLLM's CPU attention needs.
"""

from __future__ import annotations

import csv
import signal

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from safetensors.torch import load_file

pytest.importorskip("vllm", reason="vLLM is not installed here: make test-vllm runs these in .venv-vllm")

from tests.helpers import demo_datamodule, trainable_weights, trainer, unmoved  # noqa: E402
from tests.test_distributed import STRATEGY, demo_config, fit  # noqa: E402
from tests.test_resume import _config, _fit, _policy  # noqa: E402
from vlm_post.losses import GRPOLossConfig  # noqa: E402
from vlm_post.losses.rollout_correction import RolloutCorrectionConfig  # noqa: E402
from vlm_post.models.sharding import full_weight_buckets  # noqa: E402
from vlm_post.modules import (  # noqa: E402
    DistillLossConfig,
    DistillModule,
    EvalConfig,
    OptimConfig,
    RLModule,
    TeacherConfig,
)
from vlm_post.rollout import RolloutBatch, SamplingParams  # noqa: E402
from vlm_post.rollout.vllm import VLLMConfig, VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# Buckets of 1 MB: the tiny model's weights reach the engine in several reload_weights calls, as a 7B's do at 512 MB.
CPU_SETTINGS = {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 1024}
CPU_ENGINE = VLLMConfig(**CPU_SETTINGS, sync_bucket_mb=1.0)


@pytest.fixture(scope="module")
def head64(tmp_path_factory):
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vllm_rollouts") / "tiny-head64", hidden_size=256)


@pytest.fixture(scope="module")
def peaked(head64, tmp_path_factory):
    """The tiny model with its output head scaled 25 times: a peaked next-token distribution (the random head's is
    nearly uniform), so what an engine samples says which distribution it drew from."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vllm_rollouts") / "peaked"
    shutil.copytree(head64, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 25.0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(autouse=True)
def cpu_engine_env(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def sampled_distribution_logprobs(policy, samples: RolloutBatch, banned: list[int], temperature: float):
    """The policy's log-probs of the sampled tokens under the distribution an engine draws from (banned tokens out,
    then temperature), from a plain fp32 forward over the full vocabulary."""
    rows = samples.rows()
    width = rows.prompt_width
    with torch.no_grad():
        logits = policy(**rows.inputs).logits.float()[:, width - 1 : width - 1 + rows.response_mask.shape[1]]
    logits[..., banned] = float("-inf")
    logprobs = (logits / temperature).log_softmax(-1)
    return logprobs.gather(-1, rows.response_ids[..., None]).squeeze(-1)


class SyncCheckedRL(RLModule):
    """Records, at every step, the largest gap between the engine's log-probs of its samples (all rows) and the
    policy's, from a plain forward over the full vocabulary; and every step's logged metrics."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gaps: list[float] = []
        self.lengths: list[float] = []
        self.token_logprobs: list[float] = []
        self.logged: list[dict[str, float]] = []

    def score(self, samples, examples):
        engine = self.rollout_engine(self.rollout.engine)
        expected = sampled_distribution_logprobs(self.policy, samples, engine.banned, self.rollout.temperature)
        mask = samples.response_mask.bool()
        self.gaps.append(float((samples.sampler_logprobs - expected)[mask].abs().max()))
        # per response: its length and the policy's mean log-prob of its tokens (for the engines' comparison)
        self.lengths.extend(mask.sum(1).tolist())
        self.token_logprobs.extend(((expected * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist())
        return super().score(samples, examples)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.logged.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})


def rl_fit(model, data, tmp_path, steps: int, engine="vllm", lr=1e-2, n=4, **kwargs) -> SyncCheckedRL:
    """``steps`` rollout steps of 2 prompts × ``n`` samples, each followed by 4 updates at a large learning rate (2
    epochs of mini-batches of one prompt), so that every step samples from weights the previous one moved."""
    torch.manual_seed(0)
    kwargs.setdefault("old_logprobs", "sampler")
    kwargs.setdefault("loss", GRPOLossConfig(kl_mode="off"))
    module = SyncCheckedRL(
        str(model),
        rollout=SamplingParams(n=n, temperature=1.0, max_new_tokens=8, engine=engine),
        mini_batch_size=1,
        epochs=2,
        micro_batch_size=4,
        optim=OptimConfig(lr=lr),
        reward="tests.test_rl.length_reward",
        eval=EvalConfig(n=0, max_new_tokens=8),
        **{"vllm": CPU_ENGINE, **kwargs},
    )
    module.configure_model()
    module.before = trainable_weights(module.policy)
    trainer(tmp_path, max_steps=4 * steps).fit(module, demo_datamodule(data, batch_size=2))
    return module


def monitor(module: SyncCheckedRL) -> list[float]:
    """Every step's logged ``rollout/logprob_diff_max``."""
    return [step["rollout/logprob_diff_max"] for step in module.logged]


def test_rl_samples_with_vllm_from_the_weights_of_every_step(head64, demo_data, tmp_path, monkeypatch):
    module = rl_fit(head64, demo_data, tmp_path / "synced", steps=3)
    assert module.trainer.global_step == 12
    assert len(list(full_weight_buckets(module.policy, CPU_ENGINE.sync_bucket_mb))) > 3
    assert not unmoved(module.policy, module.before)
    assert len(module.gaps) == 3 and max(module.gaps) < 1e-4, module.gaps
    # the logged monitor sees the same: near 0 at every step (fp32)
    assert len(monitor(module)) == 3 and max(monitor(module)) < 1e-4, monitor(module)
    assert all(0 <= step["rollout/logprob_diff_mean"] <= step["rollout/logprob_diff_max"] for step in module.logged)
    # the engine's start (about 20 s here) is not part of the first step's sync
    assert all(0 < step["train/time_weight_sync_s"] < 5 for step in module.logged)
    assert module._vllm_engine is None, "the engine is released at the end of fit"

    # The same run with the engine given the weights only once: from the second step on it samples from the old
    # weights, and both the check above and the logged monitor see it.
    synced = []
    original = VLLMEngine.sync

    def first_sync_only(engine, policy):
        if not synced:
            original(engine, policy)
        synced.append(True)

    monkeypatch.setattr(VLLMEngine, "sync", first_sync_only)
    stale = rl_fit(head64, demo_data, tmp_path / "stale", steps=2)
    assert stale.gaps[0] < 1e-4 and stale.gaps[1] > 1e-2, stale.gaps
    assert monitor(stale)[0] < 1e-4 and monitor(stale)[1] > 1e-2, monitor(stale)


def test_an_rl_fit_with_vllm_is_within_noise_of_the_same_fit_with_hf(peaked, demo_data, tmp_path):
    """The same 3-step RL fit (2 prompts × 32 samples a step, a learning rate small enough that each step samples from
    nearly the initial weights) with each engine: the engines draw from one distribution with different random
    streams, so per response the length and the policy's mean log-prob of the sampled tokens, and per step the logged
    training metrics, differ by sampling noise only. Tested as a two-sample z-test at 4 standard errors (a
    temperature of 0.8 in the vLLM engine moved the mean log-prob by 5 standard errors); the logged metrics, one value
    a step, within 4 times the per-step spread."""
    import statistics

    runs = {
        engine: rl_fit(peaked, demo_data, tmp_path / engine, 3, engine=engine, lr=1e-5, n=32)
        for engine in ("hf", "vllm")
    }
    for field in ("lengths", "token_logprobs"):
        a, b = getattr(runs["hf"], field), getattr(runs["vllm"], field)
        assert len(a) == len(b) == 192
        error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        assert abs(statistics.mean(a) - statistics.mean(b)) <= 4 * error + 1e-9, (
            field,
            statistics.mean(a),
            statistics.mean(b),
            error,
        )
    for name in ("train/reward_mean", "train/response_length", "train/truncated_rate"):
        a, b = ([step[name] for step in runs[engine].logged] for engine in ("hf", "vllm"))
        spread = max(statistics.stdev(a), statistics.stdev(b), 1e-3 * abs(statistics.mean(a)))
        assert abs(statistics.mean(a) - statistics.mean(b)) <= 4 * spread, (name, a, b)


@pytest.mark.parametrize("fault", ["dropped", "misnamed"])
def test_a_broken_sync_shows_in_the_monitor(head64, demo_data, tmp_path, monkeypatch, fault):
    """The engine keeps the folder's value of one matrix the updates move (dropped: the logged gap jumps at the
    second step), or gets two layers' matrices under each other's names (misnamed: from the first step)."""
    first = "model.language_model.layers.0.mlp.down_proj.weight"
    second = "model.language_model.layers.1.mlp.down_proj.weight"
    original = VLLMEngine.sync

    def broken_sync(engine, policy):
        state_dict = policy.state_dict

        def broken():
            state = state_dict()
            assert first in state and second in state
            if fault == "dropped":
                del state[first]
            else:
                state[first], state[second] = state[second], state[first]
            return state

        policy.state_dict = broken
        try:
            original(engine, policy)
        finally:
            del policy.state_dict

    monkeypatch.setattr(VLLMEngine, "sync", broken_sync)
    module = rl_fit(head64, demo_data, tmp_path, steps=2)
    if fault == "dropped":
        assert monitor(module)[0] < 1e-4 and monitor(module)[1] > 1e-3, monitor(module)
    else:
        assert min(monitor(module)) > 1e-3, monitor(module)


def test_opd_samples_with_vllm_and_trains(head64, demo_data, tmp_path):
    """On-policy distillation with the student's samples from vLLM: the student trains, and the monitor says the
    engine sampled from its weights at every step."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    teacher = build_tiny_qwen2_5_vl(tmp_path / "teacher", seed=1, hidden_size=192)  # the student's tokenizer
    torch.manual_seed(0)
    module = DistillModule(
        str(head64),
        teacher=TeacherConfig(model_name_or_path=str(teacher), top_k=8),
        loss=DistillLossConfig(kind="topk"),
        rollout=SamplingParams(n=2, temperature=1.0, max_new_tokens=8, engine="vllm"),
        mini_batch_size=1,
        micro_batch_size=2,
        optim=OptimConfig(lr=1e-2),
        eval=EvalConfig(n=0, max_new_tokens=8),
        vllm=CPU_ENGINE,
    )
    module.configure_model()
    before = trainable_weights(module.policy)
    logged = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer(tmp_path / "run", max_steps=4, callbacks=[Record()]).fit(module, demo_datamodule(demo_data, batch_size=2))
    assert not unmoved(module.policy, before)
    assert len(logged) == 2 and all(step["rollout/logprob_diff_max"] < 1e-4 for step in logged), logged
    assert all("train/reverse_kl" in step and step["train/time_weight_sync_s"] > 0 for step in logged)


def test_rollout_correction_with_vllm(head64, demo_data, tmp_path):
    """Truncated importance weights from the trainer's recomputed log-probs against vLLM's: in fp32 the engine's
    distribution is the policy's less the vision tokens, so the weights sit just below 1 and the mismatch KL near 0."""
    correction = RolloutCorrectionConfig(mode="tis", level="token", cap=2.0)
    loss = GRPOLossConfig(kl_mode="off", rollout_correction=correction)
    module = rl_fit(head64, demo_data, tmp_path, steps=2, old_logprobs="recompute", loss=loss)
    assert len(module.logged) == 2
    for step in module.logged:
        assert 0.9 < step["rollout/weight_mean"] <= step["rollout/weight_max"] <= 1.0 + 1e-4, step
        assert step["rollout/masked"] == 0.0 and 0.0 <= step["rollout/kl"] < 1e-2, step


def test_sigkill_then_resume_with_vllm_matches_an_uninterrupted_run(head64, demo_data, tmp_path):
    """tests/test_resume.py's exact-resume check with ``rollout.engine: vllm``: each step's samples are seeded by the
    step (``rollout_seed``), so the resumed steps draw what the uninterrupted run drew, and the weights end equal."""

    def config(run: str, kill_at: int | None):
        path = _config(tmp_path, head64, demo_data, run, kill_at)
        settings = yaml.safe_load(path.read_text())
        model = settings["model"]["init_args"]
        model["rollout"]["engine"] = "vllm"
        model["vllm"] = CPU_SETTINGS
        path.write_text(yaml.safe_dump(settings))
        return path

    straight = _fit(config("straight", None))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _fit(config("killed", kill_at=3))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed = _fit(config("killed", None), f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = _policy(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    got = _policy(last)
    initial = _policy(tmp_path / "straight" / "checkpoints" / "epoch=0-step=2.ckpt")
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "the weights did not move: vacuous test"
    mismatched = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_colocated_engines_sample_on_every_rank(head64, demo_data, tmp_path, tensor_parallel):
    """Two trainer ranks under FSDP2 with vLLM in their process group: an engine per rank (tensor_parallel_size 1),
    or one engine over both ranks (2: each rank gives it both ranks' prompts and keeps its own rows). Every step
    gathers the sharded policy into the engines, the monitor (the largest gap over the ranks) stays near 0, the weights
    move, and the run ends cleanly: vLLM's shutdown leaves the trainer's process group to Lightning."""
    run = tmp_path / "run"
    config = demo_config("rl.yaml", head64, demo_data, run, max_steps=4, limit_val_batches=0, devices=2)
    config["trainer"].update(strategy=STRATEGY, callbacks=[], enable_checkpointing=False)
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run)},
    }
    model = config["model"]["init_args"]
    model["rollout"].update(engine="vllm", n=4, max_new_tokens=8)
    model["vllm"] = {**CPU_SETTINGS, "tensor_parallel_size": tensor_parallel, "sync_bucket_mb": 1.0}
    model["optim"]["lr"] = 1e-2
    model.update(micro_batch_size=4, mini_batch_size=1, reward="tests.test_rl.length_reward")  # 2 updates a step
    config["data"]["batch_size"] = 2
    config["export"] = {"weights": "last"}
    result = fit(config, tmp_path / "rl.yaml", timeout=900)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    with open(next(run.rglob("metrics.csv"))) as handle:
        steps = [row for row in csv.DictReader(handle) if row.get("rollout/logprob_diff_max")]
    assert len(steps) == 2, steps
    assert all(float(step["rollout/logprob_diff_max"]) < 1e-4 for step in steps), steps
    assert all(float(step["train/time_weight_sync_s"]) > 0 for step in steps), steps
    before = load_file(str(head64 / "model.safetensors"))
    after = load_file(str(run / "export" / "model.safetensors"))
    assert any(not torch.equal(after[k], before[k]) for k in before), "no weight moved"
