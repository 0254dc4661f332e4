"""RLModule on the tiny model: a training step runs the whole GRPO loop and moves the weights."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import demo_datamodule, trainable_weights, trainer, unmoved
from vlm_post.errors import ConfigError, RunStopped
from vlm_post.losses import GRPOLossConfig, OverlongConfig
from vlm_post.modules import EvalConfig, OptimConfig, RLModule
from vlm_post.rollout import SamplingParams


def length_reward(responses, examples):
    """A reward a random policy can earn: groups differ, so advantages (and gradients) are not zero."""
    return [len(text) / 10.0 for text in responses]


def rl_module(tiny_model, max_new_tokens: int = 8, **kwargs) -> RLModule:
    """The tests' RLModule: 4 samples of up to ``max_new_tokens`` per prompt, the length reward, no KL, no eval
    sampling; ``kwargs`` override or add."""
    kwargs.setdefault("loss", GRPOLossConfig(kl_mode="off"))
    return RLModule(
        str(tiny_model),
        eval=EvalConfig(n=0, max_new_tokens=8),
        rollout=SamplingParams(n=4, temperature=1.0, max_new_tokens=max_new_tokens),
        reward="tests.test_rl.length_reward",
        **kwargs,
    )


class Record(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.slow
@pytest.mark.parametrize("kl_mode", ["loss", "reward", "off"])
def test_rl_step_updates_the_policy_and_logs(tiny_model, demo_data, tmp_path, kl_mode):
    torch.manual_seed(0)
    module = rl_module(
        tiny_model,
        optim=OptimConfig(lr=1e-3),
        loss=GRPOLossConfig(kl_mode=kl_mode),
        mini_batch_size=2,
        micro_batch_size=3,
        epochs=2,
    )
    module.configure_model()
    before = trainable_weights(module.policy)
    record = Record()
    trainer(tmp_path, max_steps=4, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=4))
    # 4 prompts, mini-batches of 2 prompts, 2 epochs: 4 optimizer steps per rollout batch.
    assert module.trainer.global_step == 4
    assert before and not unmoved(module.policy, before), (
        f"trainable weights that did not move: {unmoved(module.policy, before)}"
    )
    logged = record.metrics[-1]
    for key in (
        "train/reward_mean",
        "train/reward_shaped_mean",
        "train/clip_fraction",
        "train/entropy",
        "train/ratio_mean",
        "train/response_length",
        "train/groups_filtered",
        "train/time_generate_s",
        "train/tokens_per_s",
    ):
        assert key in logged, key
    assert ("train/kl" in logged) == (kl_mode != "off")  # logged in every mode that has a reference
    assert (module.reference is not None) == (kl_mode != "off")
    if module.reference is not None:
        assert not any(k.startswith("reference") for k in module.state_dict()), "the reference must not be checkpointed"
        for key, value in module.reference.state_dict().items():
            assert torch.equal(value, before[key]), "the reference must stay at the initial weights"


@pytest.mark.slow
def test_nonfinite_loss_never_reaches_the_weights(tiny_model, demo_data, tmp_path, monkeypatch):
    from vlm_post.modules import rl

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    real = rl.grpo_loss
    monkeypatch.setattr(rl, "grpo_loss", poisoned)
    module = rl_module(tiny_model)
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    run = trainer(tmp_path, max_steps=2, max_epochs=1, limit_train_batches=2)
    run.fit(module, demo_datamodule(demo_data, batch_size=4))
    assert module.skipped_steps == 2
    assert run.global_step == 2, "a skipped step counts: max_steps ends the run"
    assert all(torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    assert all(torch.isfinite(v).all() for v in module.policy.state_dict().values())

    stopping = rl_module(tiny_model, max_consecutive_skips=3)
    with pytest.raises(RunStopped, match="3 optimizer step.s. in a row had a non-finite"):
        trainer(tmp_path, max_steps=10).fit(stopping, demo_datamodule(demo_data, batch_size=4))
    assert stopping.skipped_steps == 3 and stopping.trainer.global_step == 2


@pytest.mark.slow
def test_a_skip_between_good_steps_does_not_stop_the_run(tiny_model, demo_data, tmp_path, monkeypatch):
    from vlm_post.modules import rl

    def every_other_step_poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if module.global_step % 2 == 0 else loss), stats

    real = rl.grpo_loss
    monkeypatch.setattr(rl, "grpo_loss", every_other_step_poisoned)
    module = rl_module(tiny_model, max_consecutive_skips=2)
    run = trainer(tmp_path, max_steps=6)
    run.fit(module, demo_datamodule(demo_data, batch_size=4))
    assert run.global_step == 6 and module.skipped_steps == 3 and module.skips.consecutive == 0


@pytest.mark.slow
def test_overlong_penalty_and_filter_keep_truncated_rows_out_of_the_update(
    tiny_model, demo_data, tmp_path, monkeypatch
):
    from vlm_post.modules import rl
    from vlm_post.rollout import RolloutBatch

    events = []  # in call order: each step's finished flags, then the rows of each micro-batch it trained on
    real_rows, real_penalty = RolloutBatch.rows, rl.overlong_penalty

    def select(batch, rows=None):
        if isinstance(rows, list):  # the update's micro-batches (whole-batch forwards take slices)
            events.append(("rows", rows))
        return real_rows(batch, rows)

    def penalty(lengths, finished, *args):
        events.append(("finished", finished.clone()))
        return real_penalty(lengths, finished, *args)

    monkeypatch.setattr(RolloutBatch, "rows", select)
    monkeypatch.setattr(rl, "overlong_penalty", penalty)
    module = rl_module(tiny_model, max_new_tokens=3, overlong=rl.OverlongConfig(penalty=1.0, filter_truncated=True))
    real_generate = module.engine.generate

    def generate(*args, **kwargs):  # a random policy rarely stops within 3 tokens: call every 3rd row finished
        rollouts = real_generate(*args, **kwargs)
        rollouts.finished[::3] = True
        return rollouts

    module.engine.generate = generate
    record = Record()
    trainer(tmp_path, max_steps=2, max_epochs=1, limit_train_batches=2, callbacks=[record]).fit(
        module, demo_datamodule(demo_data, batch_size=4)
    )
    steps = [value for kind, value in events if kind == "finished"]
    assert len(steps) == 2 and not torch.cat(steps).all(), "a random policy truncates at 3 new tokens"
    assert any(kind == "rows" for kind, _ in events), "the finished rows must still be trained on"
    finished = None
    for kind, value in events:
        if kind == "finished":
            finished = value
        else:
            assert all(bool(finished[row]) for row in value), "a truncated row reached the loss"
    assert record.metrics[-1]["train/truncated_rate"] > 0


@pytest.mark.fast
def test_overlong_buffer_must_fit_the_response_budget(tiny_model):
    from vlm_post.errors import ConfigError
    from vlm_post.losses import OverlongConfig

    with pytest.raises(ConfigError, match="overlong.buffer"):
        RLModule(
            str(tiny_model), rollout=SamplingParams(n=2, max_new_tokens=4), overlong=OverlongConfig(penalty=1, buffer=4)
        )


@pytest.mark.slow
def test_the_logged_rewards_are_the_task_reward_and_its_shaping(tiny_model, demo_data, tmp_path):
    """reward_mean is the reward function's; the overlong and KL penalties are logged as their own components, and
    reward_shaped_mean (what the advantages used) is their sum; kl_mode reward logs the KL."""
    torch.manual_seed(0)
    module = rl_module(
        tiny_model,
        max_new_tokens=3,  # most responses are truncated: the overlong penalty bites
        optim=OptimConfig(lr=1e-2),
        loss=GRPOLossConfig(kl_mode="reward", kl_coef=0.1, kl_kind="k1"),
        overlong=OverlongConfig(penalty=0.5),
        epochs=2,
    )
    record = Record()
    trainer(tmp_path, max_steps=6, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=4))
    for logged in record.metrics:
        shaped = logged["train/reward_mean"] + logged["train/overlong_penalty"] + logged["train/kl_penalty"]
        assert logged["train/reward_shaped_mean"] == pytest.approx(shaped, abs=1e-5)
        assert logged["train/overlong_penalty"] == pytest.approx(-0.5 * logged["train/truncated_rate"], abs=1e-6)
        assert math.isfinite(logged["train/kl"])
    assert record.metrics[0]["train/kl"] == 0.0  # the first rollout policy is the reference
    assert any(m["train/kl"] != 0.0 and m["train/kl_penalty"] != 0.0 for m in record.metrics[1:])
    assert all(m["train/overlong_penalty"] < 0 for m in record.metrics)


@pytest.mark.fast
def test_the_response_budget_is_rollout_max_new_tokens(tiny_model):
    sum_norm = dict(aggregation="seq-mean-token-sum-norm", kl_mode="off")
    module = RLModule(str(tiny_model), rollout=SamplingParams(n=2, max_new_tokens=12), loss=GRPOLossConfig(**sum_norm))
    assert module.loss_config.max_response_length == 12
    same = RLModule(
        str(tiny_model),
        rollout=SamplingParams(n=2, max_new_tokens=12),
        loss=GRPOLossConfig(max_response_length=12, **sum_norm),
    )
    assert same.loss_config == module.loss_config
    with pytest.raises(
        ConfigError, match=r"loss.max_response_length \(8\) differs from .*rollout.max_new_tokens \(12\)"
    ):
        RLModule(
            str(tiny_model),
            rollout=SamplingParams(n=2, max_new_tokens=12),
            loss=GRPOLossConfig(max_response_length=8, **sum_norm),
        )


@pytest.mark.slow
def test_old_logprobs_from_the_sampler_skip_the_extra_forward(tiny_model, demo_data, tmp_path, monkeypatch):
    module = rl_module(
        tiny_model,
        mini_batch_size=2,
        epochs=2,
        old_logprobs="sampler",
    )
    calls = []
    monkeypatch.setattr(module, "rollout_logprobs", lambda *args: calls.append(args))
    record = Record()
    trainer(tmp_path, max_steps=4, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=4))
    assert calls == [] and module.trainer.global_step == 4
    # the first of the 4 updates is on-policy: its ratio is 1 but for the suppressed tokens' ~1% of mass
    assert 0.9 < record.metrics[-1]["train/ratio_mean"] < 1.1


@pytest.mark.slow
def test_rollout_correction_weights_the_hf_engines_samples(tiny_model, demo_data, tmp_path):
    """With the HF engine the sampler is the policy itself less the vision tokens it never samples, so every token's
    weight pi_train / pi_rollout is 1 - p(vision tokens): just below 1, never masked."""
    from vlm_post.losses.rollout_correction import RolloutCorrectionConfig

    correction = RolloutCorrectionConfig(mode="mask", level="token", cap=2.0, lower=0.5)
    module = rl_module(tiny_model, loss=GRPOLossConfig(kl_mode="off", rollout_correction=correction))
    record = Record()
    trainer(tmp_path, max_steps=2, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=2))
    for logged in record.metrics:
        assert 0.9 < logged["rollout/weight_mean"] < 1.0 and logged["rollout/weight_max"] < 1.0, logged
        assert logged["rollout/masked"] == 0.0 and 0.0 < logged["rollout/kl"] < 1e-2, logged
