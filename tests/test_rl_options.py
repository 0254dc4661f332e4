"""Each policy loss and advantage estimator of RLModule's config trains: an RL fit of 2 steps with 2 epochs (so the
second update is off-policy and the ratios leave 1) moves the weights and logs the loss's stats."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import demo_datamodule, trainable_weights, trainer, unmoved
from tests.test_rl import Record
from vlm_post.losses import EntropyControlConfig, GRPOLossConfig
from vlm_post.modules import EvalConfig, OptimConfig, RLModule
from vlm_post.ranges import NonNegativeFloat, PositiveFloat
from vlm_post.rollout import SamplingParams

pytestmark = pytest.mark.slow


def _fit(tiny_model, demo_data, tmp_path, loss: GRPOLossConfig, n: int = 4) -> tuple[dict, bool, RLModule]:
    torch.manual_seed(0)
    module = RLModule(
        str(tiny_model),
        eval=EvalConfig(n=0, max_new_tokens=8),
        rollout=SamplingParams(n=n, temperature=1.0, max_new_tokens=8),
        reward="tests.test_rl.length_reward",
        optim=OptimConfig(lr=1e-3),
        loss=loss,
        epochs=2,
        micro_batch_size=4,
    )
    module.configure_model()
    before = trainable_weights(module.policy)
    record = Record()
    trainer(tmp_path, max_steps=4, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=2))
    return record.metrics[-1], not unmoved(module.policy, before), module


@pytest.mark.parametrize(
    "policy_loss, aggregation",
    [
        ("gspo", "seq-mean-token-mean"),
        ("gspo_token", "token-mean"),
        ("sapo", "seq-mean-token-mean"),
        ("cispo", "token-mean"),
    ],
)
def test_each_policy_loss_trains(tiny_model, demo_data, tmp_path, policy_loss, aggregation):
    loss = GRPOLossConfig(policy_loss=policy_loss, aggregation=aggregation, kl_mode="off", dual_clip=None)
    logged, moved, _ = _fit(tiny_model, demo_data, tmp_path, loss)
    assert moved
    assert logged["train/ratio_max"] != 1.0  # the second epoch's update is off-policy
    assert ("train/clip_fraction" in logged) == (policy_loss != "sapo")


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "grpo_passk"])
def test_each_advantage_estimator_trains(tiny_model, demo_data, tmp_path, estimator):
    loss = GRPOLossConfig(advantage_estimator=estimator, kl_mode="off")
    logged, moved, _ = _fit(tiny_model, demo_data, tmp_path, loss)
    assert moved and "train/pg_loss" in logged


def test_reinforce_plus_plus_trains_on_one_response_per_prompt(tiny_model, demo_data, tmp_path):
    loss = GRPOLossConfig(advantage_estimator="reinforce_plus_plus", kl_mode="off")
    _, moved, _ = _fit(tiny_model, demo_data, tmp_path, loss, n=1)
    assert moved


def test_top_entropy_quantile_trains_and_the_entropy_stats_are_logged(tiny_model, demo_data, tmp_path):
    logged, moved, _ = _fit(tiny_model, demo_data, tmp_path, GRPOLossConfig(kl_mode="off", top_entropy_quantile=0.2))
    assert moved
    assert logged["train/entropy_top20_mean"] >= logged["train/entropy"]  # the top fifth's mean: at least the mean
    assert 0.0 <= logged["train/entropy_above_threshold"] <= 1.0


def test_adaptive_entropy_control_steps_its_coefficient_every_optimizer_step_and_is_checkpointed(
    tiny_model, demo_data, tmp_path
):
    # values of the range types a parsed config holds (a weights-only load of the checkpoint refuses them)
    control = EntropyControlConfig(target=NonNegativeFloat(100.0), delta=PositiveFloat(0.005))  # always below: up
    loss = GRPOLossConfig(kl_mode="off", entropy_coef=NonNegativeFloat(0.01), entropy_control=control)
    logged, _, module = _fit(tiny_model, demo_data, tmp_path, loss)
    # 2 training steps x 2 epochs = 4 optimizer steps of +0.005
    assert module.trainer.global_step == 4 and module.entropy_coef == pytest.approx(0.01 + 4 * 0.005)
    assert module.last_policy_entropy is not None and module.last_policy_entropy <= 100.0
    assert logged["train/entropy_coef"] == pytest.approx(0.03)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "state.ckpt")
    checkpoint = torch.load(tmp_path / "state.ckpt", weights_only=True)  # as --ckpt_path loads it
    resumed = RLModule(str(tiny_model), rollout=SamplingParams(n=2, max_new_tokens=4), loss=loss)
    assert resumed.entropy_coef == 0.01
    untouched: dict = {}  # a controller that never stepped keeps the config's value: a plain float too
    resumed.on_save_checkpoint(untouched)
    torch.save(untouched, tmp_path / "untouched.ckpt")
    assert torch.load(tmp_path / "untouched.ckpt", weights_only=True)["vlm_post_entropy_control"]["coef"] == 0.01
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.entropy_coef, resumed.last_policy_entropy) == (module.entropy_coef, module.last_policy_entropy)
