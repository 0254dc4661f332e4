"""Group advantages are exactly 0 on groups without signal, and unchanged on groups with one."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_post.losses import group_advantages, groups_with_signal

pytestmark = pytest.mark.fast

NON_DYADIC = [0.9, 0.1, 0.3, 1 / 3, 0.7]  # not exact in binary: a float mean of n copies can be an ulp off


def naive_fp32_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool, eps: float = 1e-6):
    """The formula in the rewards' own fp32, as group_advantages computed it before."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=-1, keepdim=True) + eps)
    return advantages.reshape(-1)


def reference_advantages(values: list[float], normalize_std: bool, eps: float = 1e-6) -> list[float]:
    """One group by hand, in Python floats (float64): mean, unbiased std, (r - mean) / (std + eps)."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return [(v - mean) / (std + eps) if normalize_std else v - mean for v in values]


def test_the_naive_fp32_formula_gives_a_constant_group_a_nonzero_advantage():
    # the bug this guards against: 8 fp32 rewards of 0.9 have a mean one ulp off 0.9, divided by 0 + 1e-6
    naive = naive_fp32_advantages(torch.full((8,), 0.9), 8, normalize_std=True)
    assert naive.abs().max() > 0.01
    assert torch.equal(group_advantages(torch.full((8,), 0.9), 8), torch.zeros(8))


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("value", NON_DYADIC)
@pytest.mark.parametrize("n", range(3, 17))
def test_groups_of_equal_rewards_get_exactly_zero_advantages(n, value, normalize_std):
    rewards = torch.full((2 * n,), value)  # two groups alike
    advantages = group_advantages(rewards, n, normalize_std=normalize_std)
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages, torch.zeros(2 * n))
    assert groups_with_signal(rewards, n).tolist() == [False, False]  # the same test of "all equal"


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("value", NON_DYADIC)
@pytest.mark.parametrize("n", [3, 5, 8, 16])
def test_a_group_with_one_different_reward_keeps_its_values(n, value, normalize_std):
    other = 1.0 - value
    rewards = torch.tensor([value] * (n - 1) + [other] + [value] * n)  # a group with signal, then one without
    advantages = group_advantages(rewards, n, normalize_std=normalize_std)
    group = [float(r) for r in rewards[:n]]  # the fp32 rewards, exactly, as Python floats
    expected = torch.tensor(reference_advantages(group, normalize_std), dtype=torch.float64)
    torch.testing.assert_close(advantages[:n], expected.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(advantages[:n], naive_fp32_advantages(rewards, n, normalize_std)[:n])  # as before
    assert torch.equal(advantages[n:], torch.zeros(n))
    assert advantages[:n].abs().min() > 0


def test_float64_rewards_give_float64_advantages_and_other_dtypes_float32():
    rewards = [0.9, 0.9, 0.9, 0.1, 0.3, 0.3]
    exact = group_advantages(torch.tensor(rewards, dtype=torch.float64), 3)
    assert exact.dtype == torch.float64
    expected = reference_advantages(rewards[:3], True) + reference_advantages(rewards[3:], True)
    torch.testing.assert_close(exact, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    for dtype in (torch.bfloat16, torch.float16, torch.int64):
        advantages = group_advantages(torch.tensor([1, 1, 1, 0, 1, 1]).to(dtype), 3)
        assert advantages.dtype == torch.float32
        assert torch.equal(advantages[:3], torch.zeros(3)) and advantages[3:].abs().min() > 0
    assert torch.equal(group_advantages(torch.full((6,), 0.9, dtype=torch.bfloat16), 3), torch.zeros(6))
