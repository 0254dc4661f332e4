"""Per-token estimators of KL(pi || ref) from log-probs of tokens sampled from pi.

With x ~ pi and the log ratio ``d = log ref(x) - log pi(x)`` (so r = e^d =
ref(x) / pi(x) and E_pi[r] = 1), Schulman's approximations
(http://joschu.net/blog/kl-approx.html) are

    k1 = -d                 = log pi(x) - log ref(x)
    k2 = d^2 / 2
    k3_unclamped = (r - 1) - d = exp(ref - logp) - (ref - logp) - 1
    k3 = low_var_kl = k3_unclamped with d clamped to [-20, 20] and the result to [-10, 10]

Names, as in verl's ``kl_penalty``: ``k3`` and ``low_var_kl`` are one
estimator, the clamped one (so ``kl_kind: k3`` means in a config here what it
means in verl), ``kl`` is ``k1`` and ``mse`` is ``k2``. The unclamped k3 has
its own name, ``k3_unclamped``: at d = 5 it is e^5 - 6 = 142.41, where
``k3`` gives 10.

Values, as estimators of KL(pi || ref) = E_pi[-d]:

- k1 is unbiased, but high-variance and negative on many samples.
- k3_unclamped is unbiased too (it adds r - 1, whose mean under pi is 0) and
  is never negative; its variance is low when pi is close to ref. k3's clamp
  of the result at 10 nats biases it (downwards) only on tokens beyond
  d = 2.6 (ref much likelier) or d = -11 (pi much likelier), where the policy
  has already left the reference; the clamp of d at +-20 lies beyond both, so
  it changes no value, it only keeps exp finite. k3 is what verl and EasyR1
  use as a loss.
- k2 is biased: E_pi[k2] = KL + O(|d|^3). Pointwise, k3_unclamped - k2 =
  e^xi d^3 / 6 for some xi between 0 and d, so
  |E[k2] - KL| <= E_pi[|d|^3 e^max(d, 0)] / 6.

Gradients, when the estimator is added to the loss and differentiated through
log pi(x) only (the samples stay fixed, as in GRPO's KL loss term):

- grad k1 = grad log pi(x), whose mean under pi is 0: as a loss term k1 pulls
  nothing towards ref in expectation (it is only useful as a reward penalty).
- grad k2 = -d grad log pi(x), whose mean is the exact gradient of
  KL(pi || ref).
- grad k3_unclamped = (1 - r) grad log pi(x), whose mean is
  -sum_x ref(x) grad log pi(x), the gradient of the *forward* KL(ref || pi),
  not of KL(pi || ref). It still pulls pi towards ref, and near ref the two
  gradients agree to first order.
- k3 (low_var_kl) has k3_unclamped's gradient inside the clamps and none
  outside them (the clamps keep exp from overflowing into inf * 0 = nan
  gradients).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

KLKind = Literal["k1", "kl", "k2", "mse", "k3", "low_var_kl", "k3_unclamped"]
KL_KINDS: tuple[str, ...] = get_args(KLKind)

# The clamp of a log ratio before exp (verl's, for low_var_kl and the PPO ratio): exp(20) is still finite in
# fp32, and a token whose probability moved by e^20 has left the reference (or the old policy) anyway.
LOG_RATIO_CLAMP = 20.0
# verl's clamp of low_var_kl's result: a per-token KL of 10 nats already means the policy has left the reference.
_LOW_VAR_KL_CLAMP = 10.0


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) at tokens sampled from pi; same shape as the inputs.

    ``logprob`` is log pi(x) (differentiable when used as a loss),
    ``ref_logprob`` log ref(x) (treated as a constant by the caller). See the
    module docstring for the names, bias and gradient of each ``kind``.
    """
    log_ratio = ref_logprob - logprob  # d = log ref(x) - log pi(x)
    if kind in ("k1", "kl"):
        return -log_ratio
    if kind in ("k2", "mse"):
        return 0.5 * log_ratio.square()
    if kind in ("k3", "low_var_kl"):
        log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.expm1(log_ratio) - log_ratio).clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    if kind == "k3_unclamped":
        return torch.expm1(log_ratio) - log_ratio  # expm1: exact near d = 0, where most tokens are
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
