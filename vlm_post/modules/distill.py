"""DistillModule: on-policy distillation (OPD), the stage-1 warm start by reverse KL to a teacher.

Algorithm, per training step (one round: a batch of ``data.batch_size`` prompts):
  1. the student samples ``rollout.n`` responses per prompt with the rollout engine (as in RL);
  2. the teacher scores the student's own tokens: at each response position its top-k token ids
     and log-probs, and the log-prob of the token the student sampled. Scores come from the
     teacher-logit cache (``teacher.cache_dir``) when it holds them; the in-process teacher
     (``teacher.model_name_or_path``) scores the rest and appends them to the cache, so a resumed
     run re-uses them instead of scoring again. The cache records the fingerprint of the teacher
     and settings that scored it, and a cache of another teacher is refused, or with
     ``teacher.on_mismatch: rescore`` scored anew into a namespace of this teacher's own;
  3. the student minimises the per-token reverse KL, KL(student || teacher), over its samples:
     ``loss.kind: topk`` (the exact KL of the top-k + tail coarsening) or ``sampled`` (the
     one-sample estimate log pi_s(y) - log pi_t(y) as a per-token advantage in a policy-gradient
     loss, optionally discounted); docs/distillation.md says when to use which;
  4. ``epochs`` passes over the round's rows in mini-batches (``mini_batch_size`` prompts each).
     ``epochs: 1`` with one mini-batch is fully on-policy (score every step); more is the
     round-based schedule (sample a round, score it all, train on it for E epochs, repeat).

Launch:
    vlm_post fit --config configs/demo/opd.yaml
    vlm_post fit --config configs/geo3k/opd_qwen2_5_vl_7b_from_72b.yaml
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.losses.distill import coarsened_reverse_kl, sampled_reverse_kl_loss, topk_entropy
from vlm_post.losses.grpo import Aggregation, aggregate
from vlm_post.models.loading import Dtype
from vlm_post.models.logprobs import batch_logprobs
from vlm_post.modules.on_policy import OnPolicyModule
from vlm_post.ranges import ClosedUnitInterval, NonNegativeFloat, PositiveInt, check_ranges
from vlm_post.rewards import AccuracyReward
from vlm_post.rollout import ModelRows, SamplingParams
from vlm_post.teacher import (
    TeacherBatch,
    TeacherFingerprint,
)
from vlm_post.teacher.scoring import HFTeacher
from vlm_post.teacher.source import TeacherScoreSource


@dataclass
class TeacherConfig:
    """Where the teacher's scores come from.

    Args:
        model_name_or_path: an in-process teacher (HF hub id or folder of an image-text-to-text
            model with the student's tokenizer). None: scores come only from ``cache_dir``,
            written by ``tools/score_teacher.py``.
        cache_dir: the teacher-logit cache, read first and appended to by the in-process teacher.
        top_k: teacher log-probs kept per position.
        dtype: the teacher's parameter dtype (``auto``: as saved).
        cache_dtype: the cached log-probs' dtype.
        wait_s: without an in-process teacher, a step writes the responses the cache lacks to
            ``<cache_dir>/rollouts/`` and waits this long for ``tools/score_teacher.py`` to score
            them before it stops with a message.
        on_mismatch: when ``cache_dir`` holds the scores of another teacher or of other scoring
            settings (its ``teacher.json`` records their fingerprint) or of an unknown teacher (a
            cache from before the fingerprint): ``error`` stops with a message naming both;
            ``rescore`` scores anew into ``<cache_dir>/teacher-<fingerprint>/``, a cache of this
            teacher's own, and leaves the scores already there as they are. Needs an in-process
            teacher (a cache-only run reads ``cache_dir`` itself, whichever teacher filled it;
            the external scorer refuses to add another teacher's scores to it).
    """

    model_name_or_path: str | None = None
    cache_dir: str | None = None
    top_k: PositiveInt = 32
    dtype: Dtype = "auto"
    cache_dtype: Literal["float16", "bfloat16"] = "float16"
    wait_s: NonNegativeFloat = 0.0
    on_mismatch: Literal["error", "rescore"] = "error"

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class DistillLossConfig:
    """The reverse-KL objective.

    Args:
        kind: ``topk``: differentiable KL over the teacher's top-k ids plus a tail bucket;
            ``sampled``: the sampled-token estimator as a per-token advantage.
        discount: ``sampled`` only: 0 scores each token by its own KL sample; up to 1 adds the
            discounted KL-to-go of the rest of the response.
        aggregation: how token losses become a scalar (as in RL).
    """

    kind: Literal["topk", "sampled"] = "topk"
    discount: ClosedUnitInterval = 0.0
    aggregation: Aggregation = "token-mean"

    def __post_init__(self) -> None:
        check_ranges(self)


torch.serialization.add_safe_globals([TeacherConfig, DistillLossConfig, SamplingParams])


class DistillModule(OnPolicyModule):
    default_rollout = SamplingParams(n=1, temperature=1.0, max_new_tokens=1024)

    def __init__(
        self,
        *args,
        teacher: TeacherConfig,
        loss: DistillLossConfig | None = None,
        **kwargs,
    ) -> None:
        """
        The rollout (the student's sampling: ``n`` responses per prompt; temperature 1 samples the
        distribution the KL is taken of), ``epochs``, ``mini_batch_size``, ``micro_batch_size`` and
        ``grad_clip`` are OnPolicyModule's.

        Args:
            teacher: the in-process teacher and/or the teacher-logit cache.
            loss: the reverse-KL objective.
        """
        super().__init__(*args, **kwargs)
        if teacher.model_name_or_path is None and teacher.cache_dir is None:
            raise ConfigError("model.teacher: set model_name_or_path (an in-process teacher), cache_dir, or both")
        if teacher.on_mismatch == "rescore" and teacher.model_name_or_path is None:
            raise ConfigError(
                "model.teacher.on_mismatch: rescore needs an in-process teacher (model.teacher.model_name_or_path): "
                "a cache-only run reads the scores in cache_dir, whichever teacher wrote them; give another teacher "
                "its own model.teacher.cache_dir instead"
            )
        self.teacher_config = teacher
        self.loss_config = loss or DistillLossConfig()
        self.teacher = (
            HFTeacher(
                teacher.model_name_or_path, self.processor, teacher.top_k, teacher.dtype, self.attn_implementation
            )
            if teacher.model_name_or_path
            else None
        )
        self.accuracy = AccuracyReward()
        self.teacher_source = TeacherScoreSource(teacher)

    # --- teacher ---------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.teacher is not None and self.sharded and self.teacher.model is None:
            # Loaded in CPU memory and sharded from there: a rank never holds the whole teacher on its device.
            self.teacher.model = self.shard(self.teacher.load("cpu").model, frozen=True)
        elif self.teacher is not None:
            self.teacher.load(self.device)
        self.teacher_source.open(self.teacher, writer_id=f"rank{self.global_rank}")

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.teacher_source.close()

    @property
    def teacher_scored_rows(self) -> int:
        """Rows the in-process teacher scored (not found in the cache)."""
        return self.teacher_source.scored_rows

    @property
    def teacher_fingerprint(self) -> TeacherFingerprint | None:
        """The in-process teacher's fingerprint (set at fit start)."""
        return self.teacher_source.fingerprint

    # --- one training step -----------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        examples = batch["examples"]
        started = time.perf_counter()
        samples = self.sample(batch)
        generated = time.perf_counter()
        gap = self.rollout_logprob_gap(samples) if self.logs_this_step() else {}  # before the update changes the policy
        # A sharded teacher's forwards are collectives: every rank runs as many scoring passes as the busiest.
        passes_to_run = self._most_over_ranks if self.sharded else None
        name = f"rank{self.global_rank}-step{self.global_step:09d}"  # of the rollout file, cache-only
        teacher = self.teacher_source.scores(samples, examples, self.micro_batch_size, name, passes_to_run)
        scored_at = time.perf_counter()
        old_logprobs = None
        if self.loss_config.kind == "sampled" and not self.single_update(len(examples)):
            old_logprobs = self.rollout_logprobs(self.policy, samples)
        stats = self._update(samples, list(range(samples.num_rows)), ScoredSamples(teacher, old_logprobs))
        elapsed = time.perf_counter() - started
        if not self.logs_this_step():
            return
        valid = samples.response_mask.bool()
        accuracy = self.accuracy.scores(samples.texts, [examples[int(i)] for i in samples.prompt_index])
        logged = {
            "train/accuracy": torch.tensor(accuracy).mean(),
            "train/response_length": samples.lengths.float().mean(),
            "train/teacher_entropy_topk": topk_entropy(teacher.topk_logprobs.float())[valid].mean(),
            "train/teacher_logprob": teacher.sampled_logprobs.float()[valid].mean(),
            "train/teacher_scored_rows": torch.tensor(float(self.teacher_scored_rows)),
            "train/time_generate_s": torch.tensor(generated - started),  # the weight sync included
            "train/time_teacher_s": torch.tensor(scored_at - generated),
            "train/time_train_s": torch.tensor(elapsed - (scored_at - started)),
            "train/tokens_per_s": samples.lengths.sum().float() / max(1e-9, elapsed),
        }
        logged.update({f"train/{name}": value for name, value in stats.items()})
        if self.weight_sync_s is not None:
            logged["train/time_weight_sync_s"] = torch.tensor(self.weight_sync_s)
        logged.update(gap)  # rollout/logprob_diff_*: vLLM's log-probs against the policy's
        self.log_dict({k: v.float() for k, v in logged.items()}, batch_size=len(examples), prog_bar=False)

    def micro_loss(self, scored: ScoredSamples, micro: list[int], rows: ModelRows) -> tuple[torch.Tensor, dict]:
        """The reverse KL to the teacher of rows ``micro`` of the batch (``rows``: their model inputs)."""
        config, teacher, mask = self.loss_config, scored.teacher, rows.response_mask
        if config.kind == "sampled":
            student = batch_logprobs(self.policy, rows, with_entropy=True, **self.sampled_scores)
            logprobs, entropy = student.logprobs, student.entropy
            old = scored.old_logprobs[micro] if scored.old_logprobs is not None else logprobs.detach()
            loss, stats = sampled_reverse_kl_loss(
                logprobs,
                old,
                teacher.sampled_logprobs[micro].float(),
                mask,
                config.discount,
                config.aggregation,
                self.rollout.max_new_tokens,
            )
            return loss, {**stats, "entropy": entropy[mask.bool()].mean()}
        # the student's log-probs at the teacher's top-k ids, and its full entropy (logged), in one pass
        ids = teacher.topk_ids[micro]
        student = batch_logprobs(self.policy, rows, ids=ids, with_entropy=True, **self.sampled_scores)
        per_token = coarsened_reverse_kl(student.logprobs, teacher.topk_logprobs[micro], mask)
        loss = aggregate(per_token, mask, config.aggregation, self.rollout.max_new_tokens)
        valid = mask.bool()
        return loss, {"reverse_kl": per_token.detach()[valid].mean(), "entropy": student.entropy.detach()[valid].mean()}


@dataclass
class ScoredSamples:
    """What an OPD step computed per row before its update: the teacher's scores of every row and, for several
    updates of the sampled-token loss, the rollout policy's log-probs (the ratio's denominator)."""

    teacher: TeacherBatch
    old_logprobs: torch.Tensor | None
