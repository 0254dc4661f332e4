"""Rollouts with Hugging Face ``generate``, on the policy's current weights (nothing to sync).

With ``n`` samples per prompt, ``generate`` would run the prompt (prefill) once per sample.
For the models whose positions we know how to carry over (Qwen2-VL, Qwen2.5-VL), the engine
prefills each prompt once instead, repeats its KV cache ``n`` times and lets ``generate``
continue from it: the same samples under the same seed (tests/test_rollout.py), n times less
prefill work.
"""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlm_post.models.forward import PER_TOKEN_KEYS, SHARED_PREFILL_MODEL_TYPES
from vlm_post.models.sharding import gathered, is_sharded
from vlm_post.rollout.base import RolloutEngine, Rollouts, SamplingParams
from vlm_post.rollout.sampler_logprobs import SampledLogprobs


class HFGenerateEngine(RolloutEngine):
    @torch.no_grad()
    def generate(
        self,
        policy: torch.nn.Module,
        prompt: dict,
        params: SamplingParams,
        logprobs: bool = False,
        images: list[list] | None = None,
        seed: int | None = None,  # unused: generate draws from torch's global generator, which checkpoints keep
    ) -> Rollouts:
        was_training = policy.training
        policy.eval()
        try:
            recorder = SampledLogprobs() if logprobs else None
            common = dict(
                **self._sampling(params, recorder),
                max_new_tokens=params.max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_token_id,
                suppress_tokens=self.banned or None,
            )
            if is_sharded(policy):
                # Gathered for the whole call, the decode steps need no collective: each rank stops when its own
                # samples are done instead of stepping in lockstep (generate's default for FSDP models).
                common["synced_gpus"] = False
            with gathered(policy):
                if not params.greedy and params.n > 1 and self._can_share_prefill(policy, prompt):
                    output = self._generate_from_shared_prefill(policy, prompt, params.n, common)
                else:
                    output = policy.generate(**prompt, **common, num_return_sequences=self.draws(params))
        finally:
            policy.train(was_training)
        response = output[:, prompt["input_ids"].shape[1] :]
        sampled_logprobs = recorder.finish(response) if recorder is not None else None
        return self.rollouts(prompt["input_ids"].shape[0], response, params.n, sampled_logprobs)

    @staticmethod
    def _sampling(params: SamplingParams, recorder: SampledLogprobs | None) -> dict:
        """generate's sampling arguments: our warpers, then the log-prob recorder (if any), every other knob neutral.

        The warpers are passed as processors (in HF's order) rather than as ``temperature``/``top_k``/``top_p``,
        because ``generate`` runs its own warpers after any given processor, and the recorder must see the
        distribution the tokens are drawn from. Everything a checkpoint's ``generation_config.json`` may set
        (Qwen2.5-VL-Instruct ships ``repetition_penalty`` 1.05, top_k 1, ...) is overridden: RL scores the
        samples under the plain policy, so the sampler must draw from it.
        """
        processors = []
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        if recorder is not None:
            processors.append(recorder)
        neutral = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0)
        neutral = (
            neutral if not params.greedy else dict(repetition_penalty=1.0, temperature=None, top_k=None, top_p=None)
        )
        return dict(do_sample=not params.greedy, logits_processor=LogitsProcessorList(processors), **neutral)

    @staticmethod
    def _can_share_prefill(policy: torch.nn.Module, prompt: dict) -> bool:
        base = getattr(policy, "model", None)
        if getattr(policy.config, "model_type", None) not in SHARED_PREFILL_MODEL_TYPES or not hasattr(
            base, "rope_deltas"
        ):
            return False
        if prompt["input_ids"].shape[1] < 2 or not bool(prompt["attention_mask"][:, -1].all()):
            return False  # the prompts must be left-padded: the last column is every prompt's last token
        shape = tuple(prompt["input_ids"].shape)
        if any(
            isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == shape and k not in PER_TOKEN_KEYS
            for k, v in prompt.items()
        ):
            return False  # a per-token input we would not know how to cut and repeat
        token_types = prompt.get("mm_token_type_ids")
        return token_types is None or not bool(token_types[:, -1].any())  # the last token is text

    @staticmethod
    def _generate_from_shared_prefill(policy: torch.nn.Module, prompt: dict, n: int, common: dict) -> torch.Tensor:
        """``generate`` with ``num_return_sequences=n``, but each prompt's prefill runs once.

        The prompts minus their last token go through the model once (images included), the KV
        cache and the position offsets are repeated ``n`` times, and ``generate`` continues from
        there with the full prompts repeated: it only runs the uncached last token, and samples
        exactly as it would have without the cache.
        """
        from transformers import DynamicCache

        per_token = {k: v for k, v in prompt.items() if k in PER_TOKEN_KEYS and isinstance(v, torch.Tensor)}
        cache_kwarg = "cache" if "cache" in inspect.signature(policy.model.forward).parameters else "past_key_values"
        cache = DynamicCache(config=policy.config)
        base = policy.model
        base.rope_deltas = None  # computed afresh by the prefill, for these prompts
        prefill = {k: (v[:, :-1] if k in per_token else v) for k, v in prompt.items()}
        base(**prefill, **{cache_kwarg: cache}, use_cache=True)
        cache.batch_repeat_interleave(n)
        base.rope_deltas = base.rope_deltas.repeat_interleave(n, dim=0)
        repeated = {k: v.repeat_interleave(n, dim=0) for k, v in per_token.items()}
        return policy.generate(**repeated, **common, **{cache_kwarg: cache})
