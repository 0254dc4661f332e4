"""The advantage estimators of the registry (vlm_post/losses/advantages.py) against values computed by hand.

Two prompts, three responses each: rewards (1, 0, 0.5) and (0, 0, 1), responses of 2, 1, 1, 3, 1 and 2 tokens.
"""

from __future__ import annotations

import pytest
import torch

from vlm_post.errors import ConfigError
from vlm_post.losses import GRPOLossConfig
from vlm_post.losses.advantages import ADVANTAGE_ESTIMATORS
from vlm_post.losses.grpo import ADVANTAGE_ESTIMATOR_NAMES

pytestmark = pytest.mark.fast

REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
LENGTHS = [2, 1, 1, 3, 1, 2]
MASK = torch.tensor([[1] * n + [0] * (3 - n) for n in LENGTHS])


def advantages(name: str, rewards=REWARDS, mask=MASK, group_size=3, normalize_std=True) -> torch.Tensor:
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, mask, normalize_std)


def test_every_name_of_the_config_is_registered():
    assert set(ADVANTAGE_ESTIMATOR_NAMES) == set(ADVANTAGE_ESTIMATORS)


def test_rloo_subtracts_the_mean_of_the_other_responses():
    # 1 - (0 + 0.5) / 2, 0 - (1 + 0.5) / 2, 0.5 - (1 + 0) / 2;  0 - (0 + 1) / 2 twice, 1 - 0
    expected = torch.tensor([0.75, -0.75, 0.0, -0.5, -0.5, 1.0])
    torch.testing.assert_close(advantages("rloo"), expected)


def test_reinforce_plus_plus_whitens_the_rewards_over_the_batchs_tokens():
    # token-weighted mean (2*1 + 0 + 0.5 + 0 + 0 + 2*1) / 10 = 0.45, unbiased variance
    # (2*0.55^2 + 0.45^2 + 0.05^2 + 3*0.45^2 + 0.45^2 + 2*0.55^2) / 9 = 2.225 / 9, std 0.4972136
    expected = torch.tensor([1.106162, -0.905042, 0.10056, -0.905042, -0.905042, 1.106162])
    torch.testing.assert_close(advantages("reinforce_plus_plus"), expected, rtol=0, atol=1e-6)


def test_reinforce_plus_plus_baseline_centres_each_group_first():
    # centred (0.5, -0.5, 0), (-1/3, -1/3, 2/3); token-weighted mean 0.5 / 10 = 0.05, then whitened as above
    expected = torch.tensor([0.94097, -1.150075, -0.104552, -0.801567, -0.801567, 1.289478])
    torch.testing.assert_close(advantages("reinforce_plus_plus_baseline"), expected, rtol=0, atol=1e-6)


def test_passk_gives_only_the_best_response_its_margin_over_the_second():
    # group 0: best 1, second 0.5, std 0.5; group 1: best 1 (the third), second 0, std sqrt(1/3)
    raw = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(advantages("grpo_passk", normalize_std=False), raw)
    scaled = torch.tensor([0.5 / (0.5 + 1e-6), 0.0, 0.0, 0.0, 0.0, 1 / (3**-0.5 + 1e-6)])
    torch.testing.assert_close(advantages("grpo_passk"), scaled)
    # a tie for the best: the margin is 0 and nobody learns
    assert torch.equal(advantages("grpo_passk", rewards=torch.tensor([1.0, 1.0, 0.0])), torch.zeros(3))


@pytest.mark.parametrize("name", ["grpo", "rloo", "grpo_passk"])
def test_a_group_of_equal_rewards_gets_exactly_zero(name):
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.0])
    assert torch.equal(advantages(name, rewards=rewards)[:3], torch.zeros(3))


def test_reinforce_plus_plus_baseline_shifts_an_equal_group_by_the_batch_mean():
    # centred exactly 0, then whitening subtracts the batch's token mean (as verl's masked_whiten does)
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.0])
    constant = advantages("reinforce_plus_plus_baseline", rewards=rewards)[:3]
    assert constant.unique().numel() == 1 and constant[0] != 0


def test_reinforce_plus_plus_takes_one_response_per_prompt():
    rewards, mask = torch.tensor([1.0, 0.0]), torch.tensor([[1, 1], [1, 0]])
    # mean (2 + 0) / 3, variance (2 (1/3)^2 + (2/3)^2) / 2 = 1/3
    expected = torch.tensor([(1 - 2 / 3) / 3**-0.5, (0 - 2 / 3) / 3**-0.5])
    torch.testing.assert_close(advantages("reinforce_plus_plus", rewards, mask, group_size=1), expected)
    for name in ("rloo", "grpo_passk", "grpo"):
        with pytest.raises(ValueError, match="group_size >= 2"):
            advantages(name, rewards, mask, group_size=1)


def test_normalize_std_off_is_refused_where_nothing_divides():
    GRPOLossConfig(advantage_estimator="grpo_passk", normalize_std=False)
    with pytest.raises(ConfigError, match="loss.normalize_std: false divides nothing with .* rloo"):
        GRPOLossConfig(advantage_estimator="rloo", normalize_std=False)
    with pytest.raises(ConfigError, match="loss.advantage_estimator: unknown 'ppo'"):
        GRPOLossConfig(advantage_estimator="ppo")


def test_one_response_per_prompt_is_refused_where_a_group_is_needed(tiny_model):
    from vlm_post.modules import RLModule
    from vlm_post.rollout import SamplingParams

    one = SamplingParams(n=1, max_new_tokens=4)
    with pytest.raises(ConfigError, match="rollout.n: 1 sample per prompt .* grpo advantage"):
        RLModule(str(tiny_model), rollout=one)
    with pytest.raises(ConfigError, match="dynamic_sampling .* rollout.n 1"):
        RLModule(str(tiny_model), rollout=one, loss=GRPOLossConfig(advantage_estimator="reinforce_plus_plus"),
                 dynamic_sampling=True)  # fmt: skip
    RLModule(str(tiny_model), rollout=one, loss=GRPOLossConfig(advantage_estimator="reinforce_plus_plus"))
