"""RLModule: GRPO-family reinforcement learning with verifiable rewards (stage 2).

Algorithm, per training step (one batch of ``data.batch_size`` prompts = the rollout batch):
  1. sample ``rollout.n`` responses per prompt with the current policy (the rollout engine);
  2. score them with the reward function (default: 0.9 * accuracy + 0.1 * format);
  3. old log-probs from the rollout policy, and reference log-probs from the frozen initial
     weights when a KL term is used (as a loss term, or subtracted from the rewards); with
     ``loss.rollout_correction``, importance weights of the trainer's old log-probs against the
     sampler's (a vLLM engine's distribution is not exactly the trainer's);
  4. advantages by ``loss.advantage_estimator`` (GRPO's group-normalised ones by default; Dr. GRPO, RLOO,
     REINFORCE++, pass@k), optionally dropping groups
     whose rewards are all equal (dynamic sampling);
  5. ``epochs`` passes over the rows in mini-batches of ``mini_batch_size`` prompts' rows;
     each mini-batch is one optimizer step, accumulated over micro-batches of ``micro_batch_size``
     rows weighted by their share of the mini-batch's response tokens (so token-mean stays exact).

Launch:
    vlm_post fit --config configs/demo/rl.yaml --model.init_from runs/demo/sft/export
    vlm_post fit --config configs/geo3k/rl_qwen2_5_vl_7b.yaml --model.init_from runs/geo3k/sft_7b/export

On the demo it takes a weak SFT warm start from 0.665 to 1.0 greedy test accuracy in 150 steps
(make demo), and it resumes exactly after SIGKILL (tests/test_resume.py).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.losses import (
    GRPOLossConfig,
    OverlongConfig,
    aggregate,
    check_overlong_buffer,
    groups_with_signal,
    grpo_loss,
    kl_reward_penalty,
    overlong_penalty,
    token_kl,
)
from vlm_post.losses.advantages import ADVANTAGE_ESTIMATORS, NEEDS_NO_GROUP
from vlm_post.losses.entropy import EntropyControlConfig, applied_entropy_coef, entropy_stats, next_entropy_coef
from vlm_post.losses.rollout_correction import RolloutCorrectionConfig, rollout_correction_weights
from vlm_post.models.logprobs import batch_logprobs
from vlm_post.modules.on_policy import OnPolicyModule
from vlm_post.ranges import NonNegativeFloat
from vlm_post.rewards import RewardFn, load_reward_fn
from vlm_post.rollout import ModelRows, RolloutBatch, SamplingParams

# Checkpoints keep these dataclasses in their hyperparameters (see base.py).
torch.serialization.add_safe_globals(
    [SamplingParams, GRPOLossConfig, OverlongConfig, RolloutCorrectionConfig, EntropyControlConfig]
)

# A frozen default, so that --model.help lists every loss option with its default (None would hide them).
DEFAULT_LOSS = GRPOLossConfig()


class RLModule(OnPolicyModule):
    def __init__(
        self,
        *args,
        loss: GRPOLossConfig = DEFAULT_LOSS,
        reward: RewardFn | str = "vlm_post.rewards.MathReward",
        overlong: OverlongConfig | None = None,
        dynamic_sampling: bool = False,
        old_logprobs: Literal["recompute", "sampler"] = "recompute",
        entropy_threshold: NonNegativeFloat = 0.672,
        **kwargs,
    ) -> None:
        """
        The rollout (the GRPO group size is ``rollout.n``), ``epochs``, ``mini_batch_size``,
        ``micro_batch_size`` and ``grad_clip`` are OnPolicyModule's.

        Args:
            loss: the GRPO-family loss (clip, aggregation, KL estimator and mode, entropy bonus).
            reward: a RewardFn (by ``class_path``) or a dotted path to a class or function.
            overlong: DAPO's handling of truncated and nearly truncated responses (a reward penalty,
                and/or leaving truncated responses out of the loss); default: off.
            dynamic_sampling: drop groups whose rewards are all equal (no learning signal).
            old_logprobs: where the PPO ratio's denominator comes from when a rollout batch gets several
                updates: ``recompute`` (a no-grad forward of the rollout policy, as verl does) or ``sampler``
                (the engine's own log-probs of the drawn tokens: no extra forward; those of the distribution
                sampled from, i.e. after top-k/top-p and without the never-sampled vision tokens).
            entropy_threshold: each step logs ``train/entropy_above_threshold``, the share of the rollouts' tokens
                whose entropy (nats) exceeds it (default: the 80th percentile of a reasoning model's token entropy,
                0.672, from the 80/20 paper), beside ``train/entropy_top20_mean``.
        """
        super().__init__(*args, **kwargs)
        # The response budget is rollout.max_new_tokens; every length derives from it (one set in loss is checked).
        self.loss_config = loss.with_max_response_length(self.rollout.max_new_tokens)
        self.reward_fn = load_reward_fn(reward)
        self.overlong = overlong or OverlongConfig()
        estimator = self.loss_config.advantage_estimator
        if self.rollout.n < 2 and estimator not in NEEDS_NO_GROUP:
            raise ConfigError(
                f"model.init_args.rollout.n: {self.rollout.n} sample per prompt has no group to compare with "
                f"(the {estimator} advantage compares a reward with its group's); use n >= 2, or "
                "loss.advantage_estimator reinforce_plus_plus (whitened over the batch)"
            )
        if self.rollout.n < 2 and dynamic_sampling:
            raise ConfigError(
                "model.init_args.dynamic_sampling drops groups whose rewards are all equal: with rollout.n 1 every "
                "group is one reward, and all would be dropped; use n >= 2 or leave it off"
            )
        check_overlong_buffer(self.overlong.buffer, self.rollout.max_new_tokens)
        if self.loss_config.rollout_correction.enabled and old_logprobs == "sampler":
            raise ConfigError(
                "model.init_args.loss.rollout_correction weighs by the trainer's log-probs of the rollout policy "
                "against the sampler's: with old_logprobs: sampler they are the same numbers; use old_logprobs: "
                "recompute"
            )
        self.dynamic_sampling = dynamic_sampling
        self.old_logprobs_source = old_logprobs
        self.entropy_threshold = entropy_threshold
        # adaptive entropy control's state: the coefficient, and the last optimizer step's entropy (checkpointed)
        self.entropy_coef = float(self.loss_config.entropy_coef)
        self.last_policy_entropy: float | None = None
        self.reference: torch.nn.Module | None = None

    def on_policy_loaded(self, policy: torch.nn.Module) -> None:
        if self.loss_config.uses_reference and self.reference is None:
            # The reference is the initial weights (after init_from): frozen, never saved in checkpoints.
            reference = self.shard(copy.deepcopy(policy).eval().requires_grad_(False), frozen=True)
            object.__setattr__(self, "reference", reference)  # not a submodule: no optimizer, no state_dict

    def on_fit_start(self) -> None:
        if self.reference is not None and not self.sharded:  # sharded: FSDP placed (or offloaded) it
            self.reference.to(self.device)

    # --- one training step -----------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        started = time.perf_counter()
        correcting = self.loss_config.rollout_correction.enabled
        samples = self.sample(batch, logprobs=self.old_logprobs_source == "sampler" or correcting)
        generated = time.perf_counter()
        gap = self.rollout_logprob_gap(samples) if self.logs_this_step() else {}  # before the update changes the policy
        scored = self.score(samples, batch["examples"])
        stats = self._update(samples, scored.kept_rows, scored)
        elapsed = time.perf_counter() - started
        if self.logs_this_step():
            times = {"time_generate_s": generated - started, "time_train_s": elapsed - (generated - started)}
            if self.weight_sync_s is not None:  # part of time_generate_s
                times["time_weight_sync_s"] = self.weight_sync_s
            self.log_step(scored, stats, times, elapsed, gap)

    def score(self, samples: RolloutBatch, examples: list) -> ScoredRollouts:
        """Rewards (task reward plus shaping), old and reference log-probs, a KL reward penalty, advantages and
        the rows the filters keep: everything the update reads, per row."""
        n, config = samples.n, self.loss_config
        rewarded = self.reward_fn(samples.texts, [examples[int(i)] for i in samples.prompt_index])
        task_rewards = torch.tensor(rewarded.reward, dtype=torch.float32, device=self.device)
        finished = samples.finished.to(self.device)
        shaping: dict[str, torch.Tensor] = {}  # the reward components added to the task reward, each logged
        if self.overlong.penalty:
            lengths = samples.lengths.to(self.device)
            shaping["overlong_penalty"] = overlong_penalty(
                lengths, finished, self.rollout.max_new_tokens, self.overlong.buffer, self.overlong.penalty
            )
        rewards = task_rewards + sum(shaping.values(), torch.zeros_like(task_rewards))
        mask = samples.response_mask
        # One update over the whole rollout batch is exactly on-policy: the old log-probs equal the current
        # ones (ratio 1), so the separate no-grad forward over every row is skipped. A KL reward penalty
        # still needs the policy's log-probs before the update.
        ref_logprobs = self.rollout_logprobs(self.reference, samples) if self.reference is not None else None
        kl_in_reward = config.kl_mode == "reward" and ref_logprobs is not None
        correction = config.rollout_correction
        needs_old = not self.single_update(len(examples)) or kl_in_reward or correction.enabled
        old_logprobs = None
        if needs_old and self.old_logprobs_source == "sampler":
            if samples.sampler_logprobs is None:
                raise ConfigError(
                    "model.old_logprobs: sampler, but the rollout engine reports no log-probs (use recompute)"
                )
            old_logprobs = samples.sampler_logprobs.to(self.device)
        elif needs_old:
            old_logprobs = self.rollout_logprobs(self.policy, samples)
        signal = groups_with_signal(rewards, n)  # on the raw rewards: a KL penalty makes every group differ
        reward_kl = None
        if kl_in_reward:
            penalised, _ = kl_reward_penalty(rewards, old_logprobs, ref_logprobs, mask, config.kl_coef, config.kl_kind)
            shaping["kl_penalty"] = penalised - rewards
            rewards = penalised
            per_token = token_kl(old_logprobs, ref_logprobs, mask, config.kl_kind)
            reward_kl = aggregate(per_token, mask, config.aggregation, config.max_response_length)
        rollout_weights, correction_stats = None, {}
        if correction.enabled:  # the trainer's rollout policy against the engine's distribution
            sampled = samples.sampler_logprobs.to(self.device)
            rollout_weights, correction_stats = rollout_correction_weights(old_logprobs, sampled, mask, correction)
        estimate = ADVANTAGE_ESTIMATORS[config.advantage_estimator]
        advantages = estimate(rewards, n, mask, config.normalize_std).to(self.device)
        keep_groups = signal if self.dynamic_sampling else torch.ones_like(signal)
        keep_rows = keep_groups.repeat_interleave(n)
        if self.overlong.filter_truncated:
            keep_rows = keep_rows & finished.bool()
        return ScoredRollouts(
            samples,
            task_rewards,
            rewarded.components,
            shaping,
            rewards,
            advantages,
            old_logprobs,
            ref_logprobs if config.kl_mode == "loss" else None,
            reward_kl,
            keep_groups,
            torch.nonzero(keep_rows).flatten().tolist(),
            rollout_weights,
            correction_stats,
        )

    def micro_loss(self, scored: ScoredRollouts, micro: list[int], rows: ModelRows) -> tuple[torch.Tensor, dict]:
        """The GRPO-family loss of rows ``micro`` of the batch (``rows``: their model inputs)."""
        # entropy: logged every step, a bonus if configured
        scores = batch_logprobs(self.policy, rows, with_entropy=True, **self.sampled_scores)
        logprobs, entropy = scores.logprobs, scores.entropy
        old, ref, weights = scored.old_logprobs, scored.loss_ref_logprobs, scored.rollout_weights
        return grpo_loss(
            logprobs,
            old[micro] if old is not None else logprobs.detach(),
            scored.advantages[micro],
            rows.response_mask,
            self.loss_config,
            ref_logprobs=ref[micro] if ref is not None else None,
            entropy=entropy,
            rollout_weights=weights[micro] if weights is not None else None,
            entropy_coef=self.applied_entropy_coef(),
        )

    # --- adaptive entropy control (loss.entropy_control) -------------------------------------------------------

    def applied_entropy_coef(self) -> float:
        """The entropy bonus's coefficient now: the config's, or adaptive control's while it applies."""
        control = self.loss_config.entropy_control
        if control is None:
            return self.loss_config.entropy_coef
        return applied_entropy_coef(self.entropy_coef, self.last_policy_entropy, control)

    def after_optimizer_step(self, token_values: dict[str, torch.Tensor]) -> None:
        control = self.loss_config.entropy_control
        if control is None:
            return
        # the token mean over every rank's tokens of the policy loss in this optimizer step (one collective)
        values = token_values.get("_policy_entropy", token_values.get("_entropy", torch.zeros(0, device=self.device)))
        totals = torch.stack([values.sum(), values.new_tensor(float(values.numel()))]).to(self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        entropy = float(totals[0] / totals[1]) if totals[1] > 0 else math.nan
        if math.isfinite(entropy):  # a step without tokens, or a non-finite one, moves nothing
            self.entropy_coef = next_entropy_coef(self.entropy_coef, entropy, control)
            self.last_policy_entropy = entropy

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # plain floats: parsed values are jsonargparse's range types, which a weights-only load refuses
        last = self.last_policy_entropy
        checkpoint["vlm_post_entropy_control"] = {
            "coef": float(self.entropy_coef),
            "last_entropy": None if last is None else float(last),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("vlm_post_entropy_control")
        if state is not None:
            self.entropy_coef, self.last_policy_entropy = state["coef"], state["last_entropy"]

    def log_step(self, scored: ScoredRollouts, stats: dict, times: dict[str, float], elapsed: float, gap: dict) -> None:
        samples, task_rewards = scored.samples, scored.task_rewards
        logged = {
            "train/reward_mean": task_rewards.mean(),  # the reward function's, before any shaping
            "train/reward_std": task_rewards.std() if task_rewards.numel() > 1 else task_rewards.new_zeros(()),
            "train/reward_shaped_mean": scored.rewards.mean(),  # what the advantages were computed from
            "train/response_length": samples.lengths.float().mean(),
            "train/groups_filtered": 1.0 - scored.keep_groups.float().mean(),
            "train/truncated_rate": 1.0 - samples.finished.float().mean(),
            **{f"train/{name}": torch.tensor(value) for name, value in times.items()},
            "train/tokens_per_s": samples.lengths.sum().float() / max(1e-9, elapsed),
        }
        logged.update(
            {f"train/{name}": torch.tensor(values).float().mean() for name, values in scored.reward_components.items()}
        )
        logged.update({f"train/{name}": value.mean() for name, value in scored.shaping.items()})
        token_stats = {name: stats.pop(name) for name in [name for name in stats if name.startswith("_")]}
        logged.update({f"train/{name}": value for name, value in stats.items()})
        entropies = token_stats.get("_entropy", torch.zeros(0))  # none when the filters kept no row
        logged.update({f"train/{name}": v for name, v in entropy_stats(entropies, self.entropy_threshold).items()})
        if self.loss_config.entropy_control is not None:  # the coefficient the next step applies, and its state
            logged["train/entropy_coef"] = torch.tensor(self.applied_entropy_coef())
            logged["train/entropy_coef_state"] = torch.tensor(self.entropy_coef)
        logged.update(gap)  # rollout/logprob_diff_*: vLLM's log-probs against the policy's
        logged.update({f"rollout/{name}": value for name, value in scored.rollout_correction.items()})
        if scored.reward_kl is not None:  # kl_mode reward: the KL of the rollout policy, aggregated as the loss would
            logged["train/kl"] = scored.reward_kl
        self.log_dict({k: v.float() for k, v in logged.items()}, batch_size=len(samples.image_counts), prog_bar=False)


@dataclass
class ScoredRollouts:
    """A rollout batch with what the step computed per row: the one place the update and the logs read.

    ``task_rewards``: the reward function's, ``reward_components`` its terms per row (accuracy, format); ``shaping``: each term added to it (overlong, KL penalty);
    ``rewards``: the shaped sum the ``advantages`` come from. ``old_logprobs``: the PPO ratio's denominator
    (None: one update, ratio 1); ``loss_ref_logprobs``: the reference's, when the KL is a loss term;
    ``kept_rows``: the rows the filters keep (dynamic sampling, overlong filter). ``rollout_weights``: the rollout
    correction's importance weights (None when it is off), ``rollout_correction`` their stats.
    """

    samples: RolloutBatch
    task_rewards: torch.Tensor
    reward_components: dict[str, list[float]]
    shaping: dict[str, torch.Tensor]
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    loss_ref_logprobs: torch.Tensor | None
    reward_kl: torch.Tensor | None
    keep_groups: torch.Tensor
    kept_rows: list[int]
    rollout_weights: torch.Tensor | None
    rollout_correction: dict[str, torch.Tensor]
