"""Advantage estimators without a critic, a registry of pure functions keyed by ``loss.advantage_estimator``.

Each maps the (B*n,) rewards of B prompts' groups of n consecutive responses to one advantage per response, which
applies to every token of it. With r_i the rewards of a group, mean and std its mean and unbiased std:

- ``grpo``: (r_i - mean) / (std + 1e-6); Dr. GRPO without the division (``normalize_std: false``).
- ``rloo`` (Ahmadian et al. 2024): r_i minus the mean of the group's other responses,
  r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) * (r_i - mean).
- ``reinforce_plus_plus`` (Hu 2025, arXiv 2501.03262): no group baseline; the return of each token (r_i at
  every token of response i: outcome rewards, no discount) whitened over all valid tokens of the batch,
  (r_i - mu) / sqrt(var + 1e-8), mu and var (unbiased) the token-weighted mean and variance. So a long response
  weighs more in mu and var, as in verl and OpenRLHF. Works with n = 1.
- ``reinforce_plus_plus_baseline``: r_i - mean first, then the same batch whitening (REINFORCE++-baseline).
- ``grpo_passk`` (arXiv 2503.19595, verl's and EasyR1's ``grpo_passk``): only the group's best response learns,
  with advantage r_max - r_second_max (divided by std + 1e-6 with ``normalize_std``); every other response 0.
  The best is the first response with the largest reward; a tie for it gives 0.

A group whose rewards are all equal gets advantages of exactly 0 in ``grpo``, ``rloo`` and ``grpo_passk``
(``group_advantages`` says why); in ``reinforce_plus_plus_baseline`` its centred 0s are then shifted by the batch
whitening like every row, as in verl (dynamic sampling drops such groups in every estimator). The statistics are computed in float64; the result is float32 (float64 for float64 rewards).
Adding an estimator is one function: ``@register_advantage_estimator("name")`` and the name in
``AdvantageEstimatorName``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

AdvantageEstimatorName = Literal["grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "grpo_passk"]
# fn(rewards (B*n,), group_size n, response_mask (B*n, L), normalize_std) -> (B*n,) advantages
AdvantageFn = Callable[[torch.Tensor, int, torch.Tensor, bool], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
# the estimators without a group baseline: the only ones that take one response per prompt
NEEDS_NO_GROUP = frozenset({"reinforce_plus_plus"})


def register_advantage_estimator(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(rewards, group_size, response_mask, normalize_std) -> advantages`` as ``name``."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"expected rewards of shape (B*n,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.detach().view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages, (B*n,) from (B*n,) rewards in consecutive groups of ``group_size``.

    GRPO (``normalize_std=True``): (r - mean_group) / (std_group + eps), with
    the unbiased std (divides by n - 1, torch.std's default, as verl uses).
    Dr. GRPO (``normalize_std=False``): r - mean_group. Needs
    ``group_size >= 2``: with one response per prompt there is no group
    baseline.

    A group whose rewards are all equal (max == min, the test of
    ``groups_with_signal``) gets advantages of exactly 0 either way. Without
    that rule, the float mean of eight fp32 rewards of 0.9 is one ulp off 0.9,
    and that ulp divided by std + eps = 0 + 1e-6 is an advantage of -0.056 on
    every row of a group without signal. The statistics are computed in
    float64; the result is float32 (float64 for float64 rewards).
    """
    if group_size < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2, got {group_size}")
    grouped = _grouped(rewards, group_size)
    out_dtype = torch.float64 if grouped.dtype == torch.float64 else torch.float32
    grouped = grouped.double()
    advantages = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=-1, keepdim=True) + eps)
    constant = (grouped.amax(dim=-1) == grouped.amin(dim=-1))[:, None]
    advantages = torch.where(constant, torch.zeros((), dtype=advantages.dtype, device=advantages.device), advantages)
    return advantages.reshape(-1).to(out_dtype)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: True for groups whose rewards are not all equal (DAPO dynamic sampling).

    A group with equal rewards has zero advantages and contributes no policy
    gradient (only KL and entropy terms), so the trainer can drop it and log
    the fraction dropped, ``1 - mask.float().mean()``. Pass the verifiable
    rewards, before any KL reward penalty, which would make every group differ.
    """
    grouped = _grouped(rewards, group_size)
    return grouped.amax(dim=-1) > grouped.amin(dim=-1)


def _zero_constant_groups(advantages: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    constant = (grouped.amax(dim=-1) == grouped.amin(dim=-1))[:, None]
    return torch.where(constant, torch.zeros((), dtype=advantages.dtype, device=advantages.device), advantages)


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return torch.float64 if rewards.dtype == torch.float64 else torch.float32


@register_advantage_estimator("grpo")
def grpo_advantages(rewards, group_size, response_mask, normalize_std) -> torch.Tensor:
    return group_advantages(rewards, group_size, normalize_std=normalize_std)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, group_size, response_mask, normalize_std) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"RLOO's leave-one-out baseline needs group_size >= 2, got {group_size}")
    grouped = _grouped(rewards, group_size).double()
    others = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = _zero_constant_groups(grouped - others, grouped)
    return advantages.reshape(-1).to(_out_dtype(rewards))


def _whiten_over_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) values, each at every valid token of its row, whitened over those tokens: (v - mu) / sqrt(var + 1e-8)
    with the token-weighted mean mu and unbiased variance var (verl's masked_whiten)."""
    if response_mask.shape[0] != values.shape[0]:
        raise ValueError(f"expected a response mask of {values.shape[0]} rows, got {tuple(response_mask.shape)}")
    tokens = response_mask.detach().bool().sum(dim=-1).to(device=values.device, dtype=torch.float64)
    total = tokens.sum()
    if total < 2:
        raise ValueError(f"whitening over the batch's tokens needs at least 2 of them, got {int(total)}")
    mean = (tokens * values).sum() / total
    variance = (tokens * (values - mean) ** 2).sum() / (total - 1)
    return (values - mean) * torch.rsqrt(variance + 1e-8)


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_advantages(rewards, group_size, response_mask, normalize_std) -> torch.Tensor:
    returns = _grouped(rewards, group_size).double().reshape(-1)
    return _whiten_over_tokens(returns, response_mask).to(_out_dtype(rewards))


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantages(rewards, group_size, response_mask, normalize_std) -> torch.Tensor:
    grouped = _grouped(rewards, group_size).double()
    centred = _zero_constant_groups(grouped - grouped.mean(dim=-1, keepdim=True), grouped).reshape(-1)
    return _whiten_over_tokens(centred, response_mask).to(_out_dtype(rewards))


@register_advantage_estimator("grpo_passk")
def passk_advantages(rewards, group_size, response_mask, normalize_std) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"pass@k advantages need group_size >= 2, got {group_size}")
    grouped = _grouped(rewards, group_size).double()
    top2 = grouped.topk(2, dim=-1).values
    best = grouped.argmax(dim=-1, keepdim=True)  # the first of the largest
    margin = top2[:, :1] - top2[:, 1:]
    if normalize_std:
        margin = margin / (grouped.std(dim=-1, keepdim=True) + 1e-6)
    advantages = torch.zeros_like(grouped).scatter(-1, best, margin)
    return _zero_constant_groups(advantages, grouped).reshape(-1).to(_out_dtype(rewards))
