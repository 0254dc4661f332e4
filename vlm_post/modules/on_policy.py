"""OnPolicyModule: what RL and on-policy distillation share.

Both stages train on the policy's own samples. One training step takes a batch
of prompts, samples ``rollout.n`` responses per prompt with the rollout engine,
scores them (rewards in RL, teacher log-probs in OPD), and then makes one or
more optimizer updates over those rows:

- ``epochs`` passes over the rows (verl's ``ppo_epochs``);
- each pass in mini-batches of ``mini_batch_size`` prompts' rows, one optimizer step each;
- each mini-batch accumulated over micro-batches of ``micro_batch_size`` rows, each
  weighted by its share of the mini-batch's response tokens, so a token-mean loss is
  the same whatever the micro-batch size.

A NaN or inf loss or gradient never reaches the weights: the optimizer step is
skipped but counted, as in every stage (vlm_post.modules.nonfinite).
Subclasses give ``_update`` the rollout batch and what their step computed per row, and define the
micro-batch loss as a method, ``micro_loss(scored, micro, model_rows) -> (loss, stats)``.
"""

from __future__ import annotations

import hashlib
import os
import time

import torch

from vlm_post.errors import ConfigError
from vlm_post.internals import logger_writes_this_step
from vlm_post.models.logprobs import batch_logprobs
from vlm_post.modules.base import PolicyModule
from vlm_post.ranges import PositiveFloat, PositiveInt
from vlm_post.rollout import ModelRows, RolloutBatch, SamplingParams
from vlm_post.rollout.vllm import require_vllm


class OnPolicyModule(PolicyModule):
    # The sampling of a subclass's config that names no ``rollout``.
    default_rollout = SamplingParams(n=5, temperature=1.0, max_new_tokens=1024)

    def __init__(
        self,
        *args,
        rollout: SamplingParams | None = None,
        epochs: PositiveInt = 1,
        mini_batch_size: PositiveInt | None = None,
        micro_batch_size: PositiveInt = 8,
        grad_clip: PositiveFloat | None = 1.0,
        **kwargs,
    ) -> None:
        """The options RL and OPD share, declared here once (the subclasses take them through ``**kwargs``).

        Args:
            rollout: sampling of the training responses (``rollout.n`` per prompt; default: the
                subclass's ``default_rollout``).
            epochs: passes over each batch of samples (1 with one mini-batch: exactly on-policy).
                verl and EasyR1 call it ``ppo_epochs``.
            mini_batch_size: prompts per optimizer step (default: the whole batch, one step per pass).
            micro_batch_size: rows (responses) per forward/backward pass.
            grad_clip: gradient norm clipping per optimizer step (these modules step the optimizer
                themselves, so ``trainer.gradient_clip_val`` must stay unset).
        """
        rollout = rollout or self.default_rollout
        require_vllm(kwargs.get("vllm"), rollout=rollout.engine)  # before PolicyModule loads anything
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.rollout = rollout
        self.epochs = epochs
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.grad_clip = grad_clip
        self.weight_sync_s: float | None = None  # of this step's sampling (``sample``)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        super().setup(stage)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP1 runs the whole training_step inside its root forward, and these modules step the optimizer
            # (backward included) there themselves, which FSDP1 does not allow.
            raise ConfigError(
                f"{type(self).__name__} cannot train under trainer.strategy FSDPStrategy (FSDP1); use "
                "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2, configured by model.fsdp), as "
                "configs/geo3k/rl_qwen2_5_vl_7b.yaml does"
            )

    def sample(self, batch: dict, logprobs: bool = False) -> RolloutBatch:
        """``rollout.n`` responses to each prompt of ``batch`` from the current policy, by ``rollout.engine``.

        vLLM samples from its own copy of the weights: it is given the policy's before every step's sampling (after
        the previous step's updates; at the first, the initial weights), in place, and ``weight_sync_s`` says how
        long that took (None with the HF engine, which samples from the policy itself). Its samples are seeded by
        the step (``rollout_seed``).
        """
        engine = self.rollout_engine(self.rollout.engine)
        self.weight_sync_s, seed = None, None
        if self.rollout.engine == "vllm":
            engine.start()  # built at its first use, once per run: not part of the sync's time
            started = time.perf_counter()
            engine.sync(self.policy)
            self.weight_sync_s = time.perf_counter() - started
            logprobs = True  # for the sync monitor (rollout_logprob_gap)
            seed = self.rollout_seed()
        samples = engine.sample(self.policy, batch, self.rollout, logprobs=logprobs, seed=seed)
        engine.sleep()  # vLLM with enable_sleep_mode: the GPU's memory to the update until the next sync
        return samples

    def rollout_seed(self) -> int:
        """The seed of this step's vLLM samples, from the run's seed, the step and the rank: a step resumed from a
        checkpoint draws the samples the uninterrupted run drew (the HF engine's generator is in the checkpoint)."""
        run_seed = os.environ.get("PL_GLOBAL_SEED", "0")
        key = f"{run_seed}/{self.global_step}/{self.global_rank}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") % 2**31

    @torch.no_grad()
    def rollout_logprob_gap(self, samples: RolloutBatch) -> dict[str, torch.Tensor]:
        """How far vLLM's log-probs of its samples are from the policy's, before the step's first update: near 0
        (fp32: about 1e-6) when the engine holds the policy's weights, large after a broken or missed sync.

        ``rollout/logprob_diff_mean`` and ``_max`` of |engine − policy| over the sampled tokens of the first
        ``micro_batch_size`` rows of every rank (one extra no-grad forward of one micro-batch). The policy's side is
        the distribution the engine draws from: the vision tokens it never samples taken out. With ``top_k`` or
        ``top_p`` the engine's distribution is also truncated and the gap includes that. Empty with the HF engine,
        which samples from the policy itself.
        """
        if self.rollout.engine != "vllm":
            return {}
        rows = samples.rows(list(range(min(self.micro_batch_size, samples.num_rows))))
        sampled = rows.response_ids[..., None]
        banned = torch.tensor(self.rollout_engine("vllm").banned, device=sampled.device)
        ids = torch.cat([sampled, banned.expand(*sampled.shape[:2], -1)], dim=-1)
        scores = batch_logprobs(self.policy, rows, ids=ids, **self.sampled_scores)
        banned_mass = scores.logprobs[..., 1:].logsumexp(-1).exp()
        policy = scores.logprobs[..., 0] - torch.log1p(-banned_mass)
        mask = rows.response_mask.bool()
        gap = (samples.sampler_logprobs[: rows.num_rows].to(policy.device) - policy)[mask].abs()
        tokens, total, largest = gap.new_tensor(gap.numel()), gap.sum(), gap.max() if gap.numel() else gap.new_zeros(())
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank's engine: a broken one shows
            reduce = self.trainer.strategy.reduce
            tokens, total = reduce(tokens, reduce_op="sum"), reduce(total, reduce_op="sum")
            largest = reduce(largest, reduce_op="max")
        if not tokens:
            return {}
        return {"rollout/logprob_diff_mean": total / tokens, "rollout/logprob_diff_max": largest}

    @property
    def sampled_scores(self) -> dict:
        """``batch_logprobs``' options for the distribution the rollouts come from: its temperature, this module's
        chunk size."""
        return {"temperature": self.rollout.temperature, "chunk_size": self.logprob_chunk_size}

    def single_update(self, num_prompts: int) -> bool:
        """One optimizer step per batch of samples: training is exactly on-policy (ratio 1)."""
        return self.epochs == 1 and (self.mini_batch_size is None or self.mini_batch_size >= num_prompts)

    @torch.no_grad()
    def rollout_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """Log-probs of every row of ``batch`` under ``model`` (the rollout policy or a frozen one), in micro-batches."""
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.response_mask.device)
        for start in range(0, batch.num_rows, self.micro_batch_size):
            chunk = slice(start, min(batch.num_rows, start + self.micro_batch_size))
            rows = batch.rows(chunk)
            out[chunk] = batch_logprobs(model, rows, **self.sampled_scores).logprobs
        return out

    def micro_loss(self, scored, micro: list[int], rows: ModelRows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of rows ``micro`` of the batch (``rows``: their model inputs) and its stats to log; ``scored``:
        what the subclass's step computed per row (rewards and advantages, teacher scores, old log-probs).

        A stat is a scalar, averaged over the micro-batches, or, when its name starts with ``_``, values per token
        (1-D), concatenated: ``_update`` returns them whole, and ``after_optimizer_step`` gets each step's."""
        raise NotImplementedError

    def _update(self, batch: RolloutBatch, rows: list[int], scored) -> dict:
        """The optimizer steps over ``rows`` of ``batch`` (the rows the filters kept), each micro-batch's loss from
        ``micro_loss(scored, ...)``."""
        mask, n = batch.response_mask, batch.n
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # A mini-batch is the kept rows of ``mini_batch_size`` prompts (filters may have dropped some rows).
        prompts = sorted({row // n for row in rows})
        per_step = self.mini_batch_size or max(1, len(prompts))
        step_of_prompt = {prompt: index // per_step for index, prompt in enumerate(prompts)}
        mini_batches: list[list[int]] = [[] for _ in range(0, len(prompts), per_step)]
        for row in rows:
            mini_batches[step_of_prompt[row // n]].append(row)
        totals: dict[str, list[torch.Tensor]] = {}  # scalar stats, averaged over the micro-batches
        token_stats: dict[str, list[torch.Tensor]] = {}  # per-token stats (names starting with _), concatenated
        # Under data parallelism each forward/backward is a collective (FSDP's gathers, the gradient sync), so every
        # rank runs as many as the busiest one: a rank whose filters kept fewer rows adds passes of zero weight.
        steps = self._most_over_ranks(len(mini_batches))
        for _ in range(self.epochs):
            for index in range(steps):
                step_rows = mini_batches[index] if index < len(mini_batches) else []
                micros = [
                    step_rows[i : i + self.micro_batch_size] for i in range(0, len(step_rows), self.micro_batch_size)
                ]
                step_tokens = mask[step_rows].sum().clamp(min=1)
                share = self.token_share(mask[step_rows].sum())  # across ranks: the global token mean
                optimizer.zero_grad()
                step_token_stats: dict[str, list[torch.Tensor]] = {}  # this optimizer step's per-token stats
                for k in range(self._most_over_ranks(len(micros))):
                    micro = micros[k] if k < len(micros) else [0]
                    loss, stats = self.micro_loss(scored, micro, batch.rows(micro))
                    if k >= len(micros):  # a zero-weight pass, only to take part in the collectives
                        self.manual_backward(loss * 0.0)
                        continue
                    # token-mean over the whole mini-batch: weigh each micro-batch by its share of tokens
                    self.manual_backward(loss * (mask[micro].sum() / step_tokens) * share)
                    for name, value in stats.items():
                        collected = step_token_stats if name.startswith("_") else totals
                        collected.setdefault(name, []).append(value.detach().float().flatten())
                finite = self.gradients_finite()
                self.record_step(finite)
                if not finite:
                    # No gradients, no update, but the step counts (global_step, schedule): see nonfinite.py.
                    optimizer.zero_grad(set_to_none=True)
                elif self.grad_clip:
                    self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                if finite:
                    self.check_weights_finite()
                step_values = {name: torch.cat(values) for name, values in step_token_stats.items()}
                self.after_optimizer_step(step_values)
                for name, values in step_values.items():
                    token_stats.setdefault(name, []).append(values)
        stats = {name: torch.cat(values).mean() for name, values in totals.items()}
        stats |= {name: torch.cat(values) for name, values in token_stats.items()}
        return stats

    def after_optimizer_step(self, token_values: dict[str, torch.Tensor]) -> None:
        """Called on every rank after each optimizer step (and in the same order), with the step's per-token stats:
        those of its micro-batches' stats whose names start with ``_``, each concatenated (1-D, this rank's)."""

    def _most_over_ranks(self, count: int) -> int:
        """The largest ``count`` over the data-parallel ranks (``count`` itself in one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return count
        value = torch.tensor(float(count), device=self.device)
        return int(self.trainer.strategy.reduce(value, reduce_op="max"))

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's values (every ``trainer.log_every_n_steps``).

        A training-step value logged on any other step is never written, only replaced by the next
        one, so these modules compute and log their per-step metrics (accuracy grading among them)
        only when it will be. Without a trainer (a module driven by hand) every step logs.
        """
        return self._trainer is None or logger_writes_this_step(self._trainer)
