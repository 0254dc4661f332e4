"""GRPO-family policy-gradient losses for RL with verifiable rewards (as in verl and EasyR1).

One RL step, for B prompts with n sampled responses each (rows grouped
consecutively: rows 0..n-1 answer prompt 0):

1. Score each response with a scalar reward. Optionally drop groups whose
   rewards are all equal (``groups_with_signal``, DAPO's dynamic sampling):
   their advantages are all zero, so they only dilute the batch.
2. Advantages without a critic, by ``advantage_estimator`` (advantages.py: GRPO's
   A_i = (r_i - mean_group) / (std_group + eps) by default, ``group_advantages``;
   Dr. GRPO without the std; RLOO, REINFORCE++, pass@k). The sequence's
   advantage applies to every one of its tokens.
3. Per token, the policy loss ``policy_loss`` names (policy_losses.py): by default
   PPO-clip, with ratio rho = pi(x) / pi_old(x),
       max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))
   (clip_high > clip_low is DAPO's "clip-higher"), and with dual clip (Ye et al.
   2020) the loss of a token with A < 0 further capped at dual_clip * |A|;
   or GSPO, SAPO, CISPO. With ``top_entropy_quantile`` < 1 only the
   highest-entropy tokens keep their loss (entropy.py).
4. Aggregate token losses into a scalar (``aggregate``): token-mean,
   seq-mean-token-mean or seq-mean-token-sum-norm (Dr. GRPO).
5. Regularise towards the reference policy, either as a loss term
   kl_coef * aggregate(KL_t) (GRPO, EasyR1) or as a reward penalty
   r - kl_coef * sum_t KL_t before step 2 (``kl_reward_penalty``, PPO-RLHF
   style); optionally subtract entropy_coef * aggregate(entropy), the
   coefficient fixed or adapted (``entropy_control``). The per-token KL_t,
   zero on padding, is ``token_kl``.

``grpo_loss`` composes 3-5 under a ``GRPOLossConfig``. Everything here is
pure torch on (rows, L) tensors of per-token log-probs (see
``token_logprobs_and_entropy``) and a (rows, L) response mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from vlm_post.errors import ConfigError
from vlm_post.losses.advantages import (  # noqa: F401 (re-exported: the loss module's step 2)
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimatorName,
    group_advantages,
    groups_with_signal,
)
from vlm_post.losses.entropy import EntropyControlConfig, high_entropy_mask
from vlm_post.losses.kl import KL_KINDS, LOG_RATIO_CLAMP, KLKind, kl_penalty
from vlm_post.losses.policy_losses import POLICY_LOSSES, PolicyLossName
from vlm_post.losses.rollout_correction import RolloutCorrectionConfig
from vlm_post.ranges import (
    AboveOne,
    NonNegativeFloat,
    PositiveFloat,
    PositiveFraction,
    PositiveInt,
    ProperFraction,
    check_ranges,
)

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KLMode = Literal["loss", "reward", "off"]
KL_MODES: tuple[str, ...] = get_args(KLMode)
POLICY_LOSS_NAMES: tuple[str, ...] = get_args(PolicyLossName)
ADVANTAGE_ESTIMATOR_NAMES: tuple[str, ...] = get_args(AdvantageEstimatorName)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation = "token-mean",
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` (rows, L) over the valid tokens of ``mask`` (rows, L) to a scalar.

    - ``token-mean``: sum over all valid tokens / number of valid tokens. Every
      token weighs the same, so long responses weigh more (DAPO, verl default).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token
      mean. Every sequence weighs the same, so a token of a long response
      weighs less (original GRPO).
    - ``seq-mean-token-sum-norm``: mean over sequences of each sequence's token
      sum / ``max_response_length``, a constant, so there is no length bias
      (Dr. GRPO). verl divides the sum over sequences by the padded length
      instead; that differs from this by the number of sequences.

    Masked positions contribute neither value nor gradient, even if they hold
    inf or nan. Rows without valid tokens (padding rows) are left out of the
    sequence means; with no valid token at all the result is 0 with a gradient
    graph. Note that with gradient accumulation the mean of micro-batch
    token-means is not the batch's token-mean; weigh micro-batches accordingly.
    """
    if values.dim() != 2 or values.shape != mask.shape:
        shapes = f"{tuple(values.shape)} and {tuple(mask.shape)}"
        raise ValueError(f"expected values and mask of the same (rows, L) shape, got {shapes}")
    valid = mask.bool()
    masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    tokens_per_row = valid.sum(dim=-1)
    rows_with_tokens = (tokens_per_row > 0).sum().clamp(min=1)
    if mode == "token-mean":
        return masked.sum() / tokens_per_row.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / tokens_per_row.clamp(min=1)).sum() / rows_with_tokens
    if mode == "seq-mean-token-sum-norm":
        if max_response_length is None or max_response_length < 1:
            raise ValueError(f"seq-mean-token-sum-norm needs max_response_length >= 1, got {max_response_length}")
        return masked.sum() / (max_response_length * rows_with_tokens)
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: GRPOLossConfig,
    token_weights: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss ``config.policy_loss`` (policy_losses.py: ppo, gspo, gspo_token, sapo, cispo); returns
    (loss, stats).

    ``logprobs`` (rows, L) are log pi(x_t) under the policy being trained, ``old_logprobs`` (rows, L) those under
    the policy that sampled (constant: detached here, so passing ``logprobs`` itself gives ratio 1 with the right
    gradient), ``advantages`` (rows,) broadcast over tokens, or (rows, L). The per-token losses are multiplied by
    ``token_weights`` (rows, L) or (rows, 1), constants (the rollout correction's importance weights), and by
    ``token_mask`` (rows, L), the tokens the loss keeps (top-entropy-quantile: the others count in the
    aggregation's token count, with a loss of 0, as in TRL), then reduced with ``aggregate(config.aggregation)``.
    Where a clip is active a token's loss is constant in the ratio (no gradient), except in cispo.

    Stats (detached scalars, means over valid tokens whatever the aggregation): the loss's own flags (``ppo``:
    ``clip_fraction``, the tokens where the PPO clip is active, i.e. the clipped term is strictly larger, and
    ``dual_clip_fraction``, those capped by the dual clip, disjoint from the former; gspo: ``clip_fraction``; cispo:
    ``clip_fraction``, the tokens whose weight is capped), ``ratio_mean``, ``ratio_min``, ``ratio_max`` of the ratio
    it used (GSPO's: the sequence's), and ``approx_kl``, the k3 estimate of KL(pi_old || pi) at the sampled tokens,
    (rho - 1) - log rho with rho the token ratio.
    """
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        shapes = f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(response_mask.shape)}"
        raise ValueError(f"expected logprobs, old_logprobs and response_mask of one (rows, L) shape, got {shapes}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if advantages.shape not in ((logprobs.shape[0], 1), logprobs.shape):
        raise ValueError(f"expected advantages of shape (rows,) or (rows, L), got {tuple(advantages.shape)}")
    advantages = advantages.detach().to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    token = POLICY_LOSSES[config.policy_loss](logprobs, old_logprobs, advantages, response_mask, config)
    token_loss = token.loss
    if token_weights is not None:
        token_loss = token_loss * token_weights.detach()
    if token_mask is not None:
        token_loss = token_loss * token_mask.detach().to(token_loss.dtype)
    loss = aggregate(token_loss, response_mask, config.aggregation, config.max_response_length)

    with torch.no_grad():
        valid = response_mask.bool()
        num_valid = valid.sum().clamp(min=1)
        ratio = token.ratio

        def token_mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, values.to(ratio.dtype), 0.0).sum() / num_valid

        any_valid = valid.any()
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        log_ratio = (logprobs.detach() - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        stats = {name: token_mean(flag) for name, flag in token.flags.items()}
        stats |= {
            "ratio_mean": token_mean(ratio),
            "ratio_min": torch.where(any_valid, torch.where(valid, ratio, torch.inf).amin(), one),
            "ratio_max": torch.where(any_valid, torch.where(valid, ratio, -torch.inf).amax(), one),
            # KL(pi_old || pi) as kl_penalty(old, new, "k3_unclamped"), on the log ratio clamped at +-20
            "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio),
        }
    return loss, stats


def token_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor, kind: KLKind
) -> torch.Tensor:
    """Per-token KL to the reference, (rows, L): ``kl_penalty(logprobs, ref_logprobs, kind)`` on valid tokens, 0 elsewhere.

    Masked positions hold exactly 0 (and get no gradient), even where the
    log-probs of padding are inf or nan. Differentiable through both log-probs:
    detach ``ref_logprobs`` (or run under no_grad) as the caller needs.
    ``aggregate(token_kl(...), mask, mode)`` is the KL of a batch as the loss
    weighs it, the ``kl`` that RL logs in every ``kl_mode`` but ``off``.
    """
    if logprobs.dim() != 2 or logprobs.shape != ref_logprobs.shape or logprobs.shape != response_mask.shape:
        shapes = f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(response_mask.shape)}"
        raise ValueError(f"expected logprobs, ref_logprobs and response_mask of one (rows, L) shape, got {shapes}")
    kl = kl_penalty(logprobs, ref_logprobs, kind)
    return torch.where(response_mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def kl_reward_penalty(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL as a reward penalty: returns (penalised rewards, per-sequence KL (rows,)); no gradient.

    Sequence rewards (rows,) become r - kl_coef * sum_t KL_t over the valid
    tokens; token-level rewards (rows, L) become r_t - kl_coef * KL_t on valid
    tokens, which sums to the same sequence reward. KL_t is
    ``token_kl(logprobs, ref_logprobs, response_mask, kind)``, by default k1
    as in verl's in-reward KL: as a reward its gradient issue (see ``kl``) does
    not arise. Apply before ``group_advantages``.
    """
    if rewards.shape not in ((logprobs.shape[0],), logprobs.shape):
        raise ValueError(f"expected rewards of shape (rows,) or (rows, L), got {tuple(rewards.shape)}")
    with torch.no_grad():
        kl = token_kl(logprobs, ref_logprobs, response_mask, kind)
        sequence_kl = kl.sum(dim=-1)
        penalty = sequence_kl if rewards.dim() == 1 else kl
        return rewards.detach() - kl_coef * penalty.to(rewards.dtype), sequence_kl


@dataclass(frozen=True)
class GRPOLossConfig:
    """Loss settings of GRPO-family RL. Defaults: EasyR1's Geometry3K recipe."""

    policy_loss: PolicyLossName = "ppo"
    """The policy loss (see policy_losses.py): ``ppo`` (clipped surrogate, verl's ``vanilla``), ``gspo`` (one
    clipped ratio per sequence; needs ``aggregation: seq-mean-token-mean``), ``gspo_token``, ``sapo`` (a soft gate
    instead of the clip) or ``cispo`` (REINFORCE with a clipped, stop-gradient importance weight)."""
    clip_low: ProperFraction = 0.2
    """PPO clip below: the ratio is clipped at 1 - clip_low (ppo, gspo, gspo_token; GSPO's paper uses 3e-4)."""
    clip_high: NonNegativeFloat = 0.3
    """PPO clip above: the ratio is clipped at 1 + clip_high (> clip_low is DAPO's clip-higher; GSPO's paper: 4e-4)."""
    dual_clip: AboveOne | None = 3.0
    """For A < 0, cap a token's loss at dual_clip * |A| (Ye et al. 2020); None: no cap. EasyR1 and verl use 3.
    ``ppo`` only."""
    sapo_tau_pos: PositiveFloat = 1.0
    """``sapo``: the gate's temperature for tokens with A > 0 (the paper's, verl's and TRL's default)."""
    sapo_tau_neg: PositiveFloat = 1.05
    """``sapo``: the gate's temperature for tokens with A <= 0 (larger: negative updates fade sooner)."""
    cispo_max_weight: AboveOne = 5.0
    """``cispo``: the importance weight's upper bound (TRL's ``epsilon_high`` for cispo, ScaleRL's 5)."""
    aggregation: Aggregation = "token-mean"
    """How token losses become a scalar, for the policy loss, the KL term and the entropy bonus; see ``aggregate``."""
    max_response_length: PositiveInt | None = None
    """The constant divisor of ``seq-mean-token-sum-norm``. Leave it unset: RL takes it from
    ``rollout.max_new_tokens``, the response budget (``with_max_response_length``); a value that differs is refused."""
    kl_coef: NonNegativeFloat = 1e-2
    """Weight of the KL to the reference policy, in the loss or in the reward (``kl_mode``)."""
    kl_kind: KLKind = "low_var_kl"
    """Per-token KL estimator, see ``kl_penalty``: k1 (= kl), k2 (= mse), k3 (= low_var_kl, clamped, as in verl),
    or k3_unclamped."""
    kl_mode: KLMode = "loss"
    """``loss``: add kl_coef * aggregate(KL) to the loss; ``reward``: subtract kl_coef * sum(KL) from
    each reward (``kl_reward_penalty``) before the advantages; ``off``: no reference model."""
    entropy_coef: NonNegativeFloat = 0.0
    """Entropy bonus: the loss gets -entropy_coef * aggregate(entropy). 0 disables it. With ``entropy_control``,
    the coefficient's start value."""
    entropy_control: EntropyControlConfig | None = None
    """Adaptive entropy control (Skywork-OR1, TRL's ``use_adaptive_entropy``): the bonus's coefficient moves after
    every optimizer step to hold the entropy at ``entropy_control.target``; see ``losses/entropy.py``. None: off."""
    top_entropy_quantile: PositiveFraction = 1.0
    """Train only on the highest-entropy tokens (the 80/20 paper: 0.2; TRL's ``top_entropy_quantile``): the policy
    loss and the entropy bonus keep the tokens at or above the (1 - q) entropy quantile of each micro-batch's
    tokens (of each rank's). 1: every token."""
    advantage_estimator: AdvantageEstimatorName = "grpo"
    """How rewards become advantages (see advantages.py): ``grpo``, ``rloo``, ``reinforce_plus_plus`` (whitened over
    the batch, no group baseline), ``reinforce_plus_plus_baseline`` or ``grpo_passk`` (only each group's best)."""
    normalize_std: bool = True
    """``grpo`` and ``grpo_passk`` divide by the group's std; False is Dr. GRPO (pair with seq-mean-token-sum-norm).
    The other estimators have no such division, and refuse False."""
    rollout_correction: RolloutCorrectionConfig = dataclasses.field(default_factory=RolloutCorrectionConfig)
    """Importance weights for the rollout engine's distribution (``mode: tis | mask``), see ``rollout_correction``."""

    def __post_init__(self) -> None:
        check_ranges(self)
        for name, value, allowed in (
            ("policy_loss", self.policy_loss, POLICY_LOSS_NAMES),
            ("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATOR_NAMES),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("kl_kind", self.kl_kind, KL_KINDS),
            ("kl_mode", self.kl_mode, KL_MODES),
        ):
            if value not in allowed:  # a config built in Python; a parsed one was checked against the Literal
                raise ConfigError(f"loss.{name}: unknown {value!r}; expected one of {allowed}")
        if not self.normalize_std and self.advantage_estimator not in ("grpo", "grpo_passk"):
            raise ConfigError(
                f"loss.normalize_std: false divides nothing with loss.advantage_estimator {self.advantage_estimator} "
                "(only grpo and grpo_passk divide by the group's std); leave it true"
            )
        if self.policy_loss == "gspo" and self.aggregation != "seq-mean-token-mean":
            # its loss is one per sequence: a token mean would weigh each sequence by its length
            raise ConfigError(
                f"loss.policy_loss gspo is a loss per sequence: it needs loss.aggregation seq-mean-token-mean, "
                f"not {self.aggregation} (gspo_token takes any aggregation)"
            )

    def with_max_response_length(self, n: int) -> GRPOLossConfig:
        """This config with ``max_response_length`` = ``n``, the rollout's ``max_new_tokens``.

        The response budget has one source: every length derives from it. A value set in the config that differs
        from ``n`` is a ConfigError.
        """
        if self.max_response_length is not None and self.max_response_length != n:
            raise ConfigError(
                f"model.init_args.loss.max_response_length ({self.max_response_length}) differs from "
                f"model.init_args.rollout.max_new_tokens ({n}): leave it unset, it is taken from the rollout"
            )
        return dataclasses.replace(self, max_response_length=n)

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss reads the per-token entropy (an entropy bonus, its control, or top-entropy masking)."""
        return self.entropy_coef > 0 or self.entropy_control is not None or self.top_entropy_quantile < 1.0

    @property
    def uses_reference(self) -> bool:
        """Whether a step needs the reference model's log-probs."""
        return self.kl_mode != "off" and self.kl_coef > 0


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: GRPOLossConfig,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
    entropy_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy_loss + kl_coef * aggregate(KL to ref) [kl_mode "loss"] - entropy_coef * aggregate(entropy).

    ``ref_logprobs`` (rows, L) are the reference's log-probs of the KL term:
    required when the config puts one in the loss (kl_mode "loss", kl_coef > 0)
    and refused otherwise (ValueError), so that no caller believes they are
    used. With kl_mode "reward" the KL went into the rewards
    (``kl_reward_penalty``), and the trainer logs ``aggregate(token_kl(...))``.
    ``entropy`` (rows, L) is needed when an entropy bonus or ``top_entropy_quantile`` < 1 needs it, and logged
    when given. With ``top_entropy_quantile`` < 1 the policy loss and the entropy bonus keep only the tokens of
    ``high_entropy_mask`` (the KL term keeps all). ``entropy_coef`` is the bonus's coefficient now (adaptive entropy
    control's; default ``config.entropy_coef``).
    ``rollout_weights`` (rows, L), ``rollout_correction_weights``, multiply the policy loss's tokens (as
    verl does; TRL weights its KL term too): required when ``config.rollout_correction`` is on, refused otherwise.
    Stats: those of ``policy_loss`` plus ``pg_loss``, ``loss``, and
    ``kl`` (the KL term before kl_coef) / ``entropy``, aggregated like the
    loss, when their inputs are given. With ``entropy``, two per-token stats, 1-D, whose names start with ``_``:
    ``_entropy`` (the valid tokens') and, with ``top_entropy_quantile`` < 1, ``_policy_entropy`` (those the policy
    loss keeps; otherwise they are all, ``_entropy``).
    """
    if config.rollout_correction.enabled != (rollout_weights is not None):
        state = "on" if config.rollout_correction.enabled else "off"
        raise ValueError(f"rollout_correction is {state}: rollout_weights must be given exactly when it is on")
    entropy_coef = config.entropy_coef if entropy_coef is None else entropy_coef
    if entropy is None and (config.needs_entropy or entropy_coef > 0):
        raise ValueError("an entropy bonus or top_entropy_quantile < 1 needs the per-token entropy")
    keep = None
    if config.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(entropy, response_mask, config.top_entropy_quantile)
    pg_loss, stats = policy_loss(
        logprobs, old_logprobs, advantages, response_mask, config, token_weights=rollout_weights, token_mask=keep
    )
    loss = pg_loss
    stats["pg_loss"] = pg_loss.detach()
    kl_in_loss = config.kl_mode == "loss" and config.kl_coef > 0
    if kl_in_loss and ref_logprobs is None:
        raise ValueError("kl_mode 'loss' with kl_coef > 0 needs ref_logprobs")
    if not kl_in_loss and ref_logprobs is not None:
        raise ValueError(
            f"ref_logprobs given, but kl_mode {config.kl_mode!r} with kl_coef {config.kl_coef} puts no KL term in "
            "the loss: they would not be used"
        )
    if kl_in_loss:
        per_token = token_kl(logprobs, ref_logprobs.detach(), response_mask, config.kl_kind)
        kl = aggregate(per_token, response_mask, config.aggregation, config.max_response_length)
        stats["kl"] = kl.detach()
        loss = loss + config.kl_coef * kl
    if entropy is not None:
        mean_entropy = aggregate(entropy, response_mask, config.aggregation, config.max_response_length)
        stats["entropy"] = mean_entropy.detach()
        policy_tokens = response_mask.bool() if keep is None else keep
        if entropy_coef > 0:  # on the tokens the policy loss keeps, as TRL
            bonus = aggregate(entropy, policy_tokens, config.aggregation, config.max_response_length)
            loss = loss - entropy_coef * bonus
        stats["_entropy"] = entropy.detach()[response_mask.bool()]
        if keep is not None:  # otherwise the policy loss's tokens are all of them: _entropy
            stats["_policy_entropy"] = entropy.detach()[keep]
    stats["loss"] = loss.detach()
    return loss, stats
