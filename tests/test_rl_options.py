"""Each policy loss and advantage estimator of RLModule's config trains: an RL fit of 2 steps with 2 epochs (so the
second update is off-policy and the ratios leave 1) moves the weights and logs the loss's stats."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import demo_datamodule, trainable_weights, trainer, unmoved
from tests.test_rl import Record
from vlm_post.losses import GRPOLossConfig
from vlm_post.modules import EvalConfig, OptimConfig, RLModule
from vlm_post.rollout import SamplingParams

pytestmark = pytest.mark.slow


def _fit(tiny_model, demo_data, tmp_path, loss: GRPOLossConfig, n: int = 4) -> tuple[dict, bool]:
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
    return record.metrics[-1], not unmoved(module.policy, before)


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
    logged, moved = _fit(tiny_model, demo_data, tmp_path, loss)
    assert moved
    assert logged["train/ratio_max"] != 1.0  # the second epoch's update is off-policy
    assert ("train/clip_fraction" in logged) == (policy_loss != "sapo")


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "grpo_passk"])
def test_each_advantage_estimator_trains(tiny_model, demo_data, tmp_path, estimator):
    logged, moved = _fit(tiny_model, demo_data, tmp_path, GRPOLossConfig(advantage_estimator=estimator, kl_mode="off"))
    assert moved and "train/pg_loss" in logged


def test_reinforce_plus_plus_trains_on_one_response_per_prompt(tiny_model, demo_data, tmp_path):
    loss = GRPOLossConfig(advantage_estimator="reinforce_plus_plus", kl_mode="off")
    _, moved = _fit(tiny_model, demo_data, tmp_path, loss, n=1)
    assert moved
