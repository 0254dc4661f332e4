"""The policy losses and entropy tools against TRL's own code on the same tensors (skips without TRL, which is a
bench-only baseline: ``pip install -e '.[bench]'``).

TRL 1.16 computes its losses inline in ``GRPOTrainer._compute_loss``, not in functions of their own. These tests
run that method unchanged on a trainer object built without ``__init__`` (no model, no data: its settings set
by hand), whose forward returns the given log-probs and entropies; its ``accelerate.Accelerator`` is a real one
(one process). The log-probs are leaves, so both losses' gradients compare too.

The correspondences (TRL's settings -> vlm_post's GRPOLossConfig):
- ``loss_type: dapo`` -> ``ppo`` with ``token-mean`` and no dual clip; ``epsilon``/``epsilon_high`` -> clip_low/high;
- ``loss_type: grpo, importance_sampling_level: sequence`` -> ``gspo`` (``seq-mean-token-mean``);
- ``loss_type: sapo`` -> ``sapo`` with ``seq-mean-token-mean``; ``sapo_temperature_pos/neg`` -> sapo_tau_pos/neg;
- ``loss_type: cispo`` -> ``cispo`` with ``token-mean``; ``epsilon_high`` -> cispo_max_weight;
- ``top_entropy_quantile`` -> top_entropy_quantile; ``use_adaptive_entropy`` and ``entropy_*`` -> entropy_control.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlm_post.losses import EntropyControlConfig, GRPOLossConfig, grpo_loss
from vlm_post.losses.entropy import applied_entropy_coef, next_entropy_coef

pytestmark = pytest.mark.fast
trl = pytest.importorskip("trl", reason="TRL is the bench's baseline only: pip install -e '.[bench]'")

ROWS, LENGTH = 6, 7


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(ROWS, LENGTH, generator=generator) * 3 - 0.1
    logprobs = (old + 0.4 * torch.randn(ROWS, LENGTH, generator=generator)).clamp(max=-1e-3).requires_grad_()
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    advantages = torch.randn(ROWS, generator=generator)
    entropy = (torch.rand(ROWS, LENGTH, generator=generator) * 2).requires_grad_()
    return logprobs, old, mask, advantages, entropy


def _trl_trainer(logprobs, entropy, **settings):
    from accelerate import Accelerator
    from trl import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    args = {
        "delta": None,
        "sapo_temperature_pos": 1.0,
        "sapo_temperature_neg": 1.05,
        "use_bias_correction_kl": False,
        "steps_per_generation": 1,
        "entropy_target": 0.2,
        "entropy_coef_delta": 0.005,
        "entropy_coef_min": 0.0,
        "entropy_coef_max": 1.0,
    }
    args.update({k: settings.pop(k) for k in list(settings) if k in args})
    fields = {
        "args": SimpleNamespace(**args),
        "accelerator": Accelerator(cpu=True),
        "model": torch.nn.Linear(1, 1),  # in train mode: TRL's loss reads model.training
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "importance_sampling_level": "token",
        "beta": 0.0,
        "loss_type": "dapo",
        "epsilon_low": 0.2,
        "epsilon_high": 0.2,
        "use_vllm": False,
        "current_gradient_accumulation_steps": 1,
        "entropy_coef": 0.0,
        "use_adaptive_entropy": False,
        "_last_world_entropy": float("inf"),
        "_entropy_window_stats": None,
        "aux_loss_enabled": False,
        "_metrics": defaultdict(lambda: defaultdict(list)),
    }
    fields.update(settings)
    fields["_entropy_bonus_enabled"] = fields["entropy_coef"] != 0.0 or fields["use_adaptive_entropy"]
    fields["_get_per_token_logps_and_entropies"] = lambda *args, **kwargs: (logprobs, entropy, None)
    for name, value in fields.items():
        setattr(trainer, name, value)
    return trainer


def _trl_loss(trainer, old, mask, advantages):
    from trl import GRPOTrainer

    inputs = {
        "prompt_ids": torch.zeros(ROWS, 1, dtype=torch.long),
        "prompt_mask": torch.ones(ROWS, 1, dtype=torch.long),
        "completion_ids": torch.zeros(ROWS, LENGTH, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def _assert_same(ours, theirs, logprobs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (our_grad,) = torch.autograd.grad(ours, logprobs, retain_graph=True)
    (their_grad,) = torch.autograd.grad(theirs, logprobs, retain_graph=True)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)


CASES = {
    "ppo": (
        {"loss_type": "dapo", "epsilon_low": 0.2, "epsilon_high": 0.28},
        {"policy_loss": "ppo", "aggregation": "token-mean", "clip_low": 0.2, "clip_high": 0.28},
    ),
    "gspo": (
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon_low": 0.05, "epsilon_high": 0.08},
        {"policy_loss": "gspo", "aggregation": "seq-mean-token-mean", "clip_low": 0.05, "clip_high": 0.08},
    ),
    "sapo": (
        {"loss_type": "sapo", "sapo_temperature_pos": 1.2, "sapo_temperature_neg": 2.0},
        {"policy_loss": "sapo", "aggregation": "seq-mean-token-mean", "sapo_tau_pos": 1.2, "sapo_tau_neg": 2.0},
    ),
    "cispo": (
        {"loss_type": "cispo", "epsilon_high": 1.3},
        {"policy_loss": "cispo", "aggregation": "token-mean", "cispo_max_weight": 1.3},
    ),
    "top_entropy_quantile": (
        {"loss_type": "dapo", "top_entropy_quantile": 0.2},
        {"policy_loss": "ppo", "aggregation": "token-mean", "clip_high": 0.2, "top_entropy_quantile": 0.2},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_loss_equals_trls_in_value_and_gradient(case):
    theirs_settings, ours_settings = CASES[case]
    logprobs, old, mask, advantages, entropy = _batch()
    trainer = _trl_trainer(logprobs, entropy, **theirs_settings)
    theirs = _trl_loss(trainer, old, mask, advantages)
    config = GRPOLossConfig(kl_mode="off", dual_clip=None, **ours_settings)
    ours, _ = grpo_loss(logprobs, old, advantages, mask, config, entropy=entropy)
    _assert_same(ours, theirs, logprobs)


def test_adaptive_entropy_control_follows_trls_coefficient_step_by_step():
    control = EntropyControlConfig(target=1.5, delta=0.05, coef_min=0.0, coef_max=0.12)
    settings = {"entropy_target": 1.5, "entropy_coef_delta": 0.05, "entropy_coef_min": 0.0, "entropy_coef_max": 0.12}
    config = GRPOLossConfig(kl_mode="off", dual_clip=None, aggregation="token-mean", clip_high=0.2,
                            entropy_coef=0.02, entropy_control=control, top_entropy_quantile=0.5)  # fmt: skip
    coef, last_entropy = config.entropy_coef, None
    trainer = None
    for step in range(5):  # each _compute_loss call is one optimizer step (no accumulation)
        logprobs, old, mask, advantages, entropy = _batch(seed=step)
        if step == 3:
            entropy = (entropy.detach() + 1.0).requires_grad_()  # above the target: the coefficient falls
        if trainer is None:
            trainer = _trl_trainer(logprobs, entropy, entropy_coef=0.02, use_adaptive_entropy=True,
                                   top_entropy_quantile=0.5, **settings)  # fmt: skip
        trainer._get_per_token_logps_and_entropies = lambda *a, lp=logprobs, en=entropy, **k: (lp, en, None)
        theirs = _trl_loss(trainer, old, mask, advantages)
        ours, stats = grpo_loss(logprobs, old, advantages, mask, config, entropy=entropy,
                                entropy_coef=applied_entropy_coef(coef, last_entropy, control))  # fmt: skip
        _assert_same(ours, theirs, logprobs)
        last_entropy = float(stats["_policy_entropy"].mean())
        coef = next_entropy_coef(coef, last_entropy, control)
        assert coef == pytest.approx(trainer.entropy_coef) and last_entropy == pytest.approx(
            trainer._last_world_entropy
        )
    # the steps went up and down, and reached the floor: 0.07, 0.02, 0.0, 0.0, 0.05
    trace = trainer._metrics["train"]["entropy_coef"]
    assert max(trace) > 0.02 and 0.0 in trace and trace[-1] > trace[-2]
