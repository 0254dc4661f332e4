"""A training step reaches the Hugging Face forward through at most 4 functions of ours (#27): the update loop,
the micro-batch loss, ``batch_logprobs`` and ``response_hidden_states`` (or, for the scores before the update,
``score``/``rollout_logprobs``, the teacher's ``scores``/``score``). A new layer in between fails here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vlm_post
from tests.helpers import demo_datamodule, trainer
from tests.test_distill import distill_module, tiny_teacher  # noqa: F401 (a fixture)
from tests.test_rl import rl_module
from vlm_post.losses import GRPOLossConfig
from vlm_post.models.sharding import root_forward
from vlm_post.modules import DistillLossConfig, TeacherConfig

PACKAGE = str(Path(vlm_post.__file__).parent)
# root_forward's wrapper: a decorator that makes a function the sharded model's forward, not a step of the work
DECORATOR = root_forward(lambda model: None).__code__
MOST = 4


def chains_to_base_forwards(models: dict[str, torch.nn.Module]) -> tuple[list, list]:
    """Hooks that record, at each base-model (decoder) forward of ``models`` below a training step, the functions
    of vlm_post between the step and the forward; and the hooks' handles."""
    chains: list[tuple[str, tuple[str, ...]]] = []

    def record(name):
        def hook(module, args, kwargs):
            frame, chain = sys._getframe(1), []
            while frame is not None and frame.f_code.co_name != "training_step":
                code = frame.f_code
                if code.co_filename.startswith(PACKAGE) and code is not DECORATOR:
                    chain.append(code.co_qualname)
                frame = frame.f_back
            if frame is not None:
                chains.append((name, tuple(reversed(chain))))

        return hook

    handles = [model.model.register_forward_pre_hook(record(name), with_kwargs=True) for name, model in models.items()]
    return chains, handles


def training_chains(module, models, data, tmp_path) -> list:
    chains, handles = chains_to_base_forwards(models)
    try:
        trainer(tmp_path, max_steps=1).fit(module, data)
    finally:
        for handle in handles:
            handle.remove()
    return chains


def outside_generation(chains: list) -> list:
    """The chains of the forwards that score rows (generation's forwards run under the rollout engine)."""
    return [(name, chain) for name, chain in chains if not any(".sample" in step for step in chain)]


@pytest.mark.slow
def test_rl_step_reaches_the_forward_within_four_calls(tiny_model, demo_data, tmp_path):
    # a KL loss term (the reference's log-probs) and two epochs (the old log-probs): every scoring path runs
    module = rl_module(tiny_model, loss=GRPOLossConfig(kl_mode="loss"), epochs=2, micro_batch_size=3)
    module.configure_model()
    models = {"policy": module.policy, "reference": module.reference}
    chains = outside_generation(training_chains(module, models, demo_datamodule(demo_data, batch_size=2), tmp_path))
    assert {chain for _, chain in chains} == {
        ("RLModule.score", "OnPolicyModule.rollout_logprobs", "batch_logprobs", "response_hidden_states"),
        ("OnPolicyModule._update", "RLModule.micro_loss", "batch_logprobs", "response_hidden_states"),
    }
    assert {name for name, _ in chains} == {"policy", "reference"}
    assert max(len(chain) for _, chain in chains) <= MOST


@pytest.mark.slow
def test_opd_step_reaches_the_forward_within_four_calls(tiny_model, tiny_teacher, demo_data, tmp_path):  # noqa: F811
    module = distill_module(
        tiny_model, TeacherConfig(model_name_or_path=str(tiny_teacher), top_k=4), loss=DistillLossConfig(kind="topk")
    )
    module.configure_model()
    module.teacher.load("cpu")
    models = {"policy": module.policy, "teacher": module.teacher.model}
    chains = outside_generation(training_chains(module, models, demo_datamodule(demo_data, batch_size=2), tmp_path))
    assert {chain for _, chain in chains} == {
        ("TeacherScoreSource.scores", "HFTeacher.score", "batch_logprobs", "response_hidden_states"),
        ("OnPolicyModule._update", "DistillModule.micro_loss", "batch_logprobs", "response_hidden_states"),
    }
    assert max(len(chain) for _, chain in chains) <= MOST
