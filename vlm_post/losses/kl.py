"""Per-token estimators of KL(pi || ref) from log-probs of tokens sampled from pi.

With x ~ pi and the log ratio ``d = log ref(x) - log pi(x)`` (so r = e^d =
ref(x) / pi(x) and E_pi[r] = 1), Schulman's approximations
(http://joschu.net/blog/kl-approx.html) are

    k1 = -d                 = log pi(x) - log ref(x)
    k2 = d^2 / 2
    k3 = (r - 1) - d        = exp(ref - logp) - (ref - logp) - 1
    low_var_kl = k3 with d clamped to [-20, 20] and the result to [-10, 10]  (verl)

Values, as estimators of KL(pi || ref) = E_pi[-d]:

- k1 is unbiased, but high-variance and negative on many samples.
- k3 is unbiased too (it adds r - 1, whose mean under pi is 0) and is never
  negative; its variance is low when pi is close to ref. This is what verl and
  EasyR1 use as a loss ("low_var_kl").
- k2 is biased: E_pi[k2] = KL + O(|d|^3). Pointwise, k3 - k2 = e^xi d^3 / 6
  for some xi between 0 and d, so |E[k2] - KL| <= E_pi[|d|^3 e^max(d, 0)] / 6.

Gradients, when the estimator is added to the loss and differentiated through
log pi(x) only (the samples stay fixed, as in GRPO's KL loss term):

- grad k1 = grad log pi(x), whose mean under pi is 0: as a loss term k1 pulls
  nothing towards ref in expectation (it is only useful as a reward penalty).
- grad k2 = -d grad log pi(x), whose mean is the exact gradient of
  KL(pi || ref).
- grad k3 = (1 - r) grad log pi(x), whose mean is -sum_x ref(x) grad log pi(x),
  the gradient of the *forward* KL(ref || pi), not of KL(pi || ref). It still
  pulls pi towards ref, and near ref the two gradients agree to first order.
- low_var_kl has k3's gradient inside the clamp and none outside it (the
  clamps keep exp from overflowing into inf * 0 = nan gradients).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

KLKind = Literal["k1", "k2", "k3", "low_var_kl"]
KL_KINDS: tuple[str, ...] = get_args(KLKind)

# verl's clamps for low_var_kl: exp(20) is still finite in fp32, and a
# per-token KL of 10 nats already means the policy has left the reference.
_LOG_RATIO_CLAMP = 20.0
_LOW_VAR_KL_CLAMP = 10.0


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) at tokens sampled from pi; same shape as the inputs.

    ``logprob`` is log pi(x) (differentiable when used as a loss),
    ``ref_logprob`` log ref(x) (treated as a constant by the caller). See the
    module docstring for bias and gradient of each ``kind``.
    """
    log_ratio = ref_logprob - logprob  # d = log ref(x) - log pi(x)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1: exact near d = 0, where most tokens are
    if kind == "low_var_kl":
        log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (torch.expm1(log_ratio) - log_ratio).clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
