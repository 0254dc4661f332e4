"""Rollouts with vLLM: the same ``generate`` as the HF engine, from an engine that holds its own copy of the weights.

The prompts go in as the project's own token ids (``TokensPrompt``, the processor's expansion of each image
placeholder included) with each prompt's images, so vLLM sees exactly what the HF engine sees and re-tokenizes
nothing. Responses come back as token ids and are decoded by the project's processor, as the HF engine's are.

The engine is built from the policy's folder (architecture, tokenizer, image processor) and then given the
policy's current weights (``sync``), so weights from ``init_from`` or from training are what it samples from.
It is built once per run and released (``close``) before anything else needs its memory.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.models.sharding import full_weight_buckets
from vlm_post.ranges import PositiveFloat, PositiveFraction, PositiveInt, check_ranges
from vlm_post.rollout.base import RolloutEngine, Rollouts, SamplingParams

# vLLM's logit bias is clamped to [-100, 100]: a banned token keeps a probability of e^-100 relative to its logit,
# which no sampler draws and greedy never picks.
BANNED_LOGIT_BIAS = -100.0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm(key: str) -> None:
    """One line at parse time where ``engine: vllm`` is asked for and vLLM is not importable."""
    if not vllm_available():
        raise ConfigError(
            f"{key}: vllm, but vLLM is not installed in this environment ({sys.executable}): "
            "pip install 'vlm_post[vllm]' on a CUDA machine, or 'make setup-vllm' for the CPU build (.venv-vllm)"
        )


@dataclass
class VLLMConfig:
    """The vLLM engine's settings (used wherever an ``engine: vllm`` asks for it).

    The defaults suit a 7B model evaluated on one 80 GB H100: the policy stays on the GPU beside the engine (it
    is the source of the engine's weights and runs the entropy pass), so the engine takes 60% (48 GB: bf16
    weights, 15 GB, and the KV cache) and leaves the rest to the policy (15 GB) and its forward passes. Inside
    ``fit`` the optimizer's state shares the GPU too: lower ``gpu_memory_utilization`` to what training leaves.

    Args:
        tensor_parallel_size: GPUs one engine spreads the model over.
        gpu_memory_utilization: fraction of the GPU's memory the engine may take (weights, activations, KV cache).
        max_model_len: longest prompt + response, in tokens (default: the model's own limit). Lowering it
            to ``data.max_prompt_length + eval.max_new_tokens`` frees KV-cache memory.
        dtype: the engine's weight dtype (``auto``: the model folder's, bf16 for Qwen2.5-VL).
        enforce_eager: no CUDA graphs (slower decoding, faster start, less memory).
        sync_bucket_mb: the policy's weights go to the engine in buckets of about this many MB of full tensors
            (gathered bucket by bucket under FSDP2), so the sync holds one bucket at a time beside the two models.
    """

    tensor_parallel_size: PositiveInt = 1
    gpu_memory_utilization: PositiveFraction = 0.6
    max_model_len: PositiveInt | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    enforce_eager: bool = False
    sync_bucket_mb: PositiveFloat = 512.0

    def __post_init__(self) -> None:
        check_ranges(self)


class VLLMEngine(RolloutEngine):
    def __init__(self, processor, model_path: str, config: VLLMConfig | None = None, seed: int = 0) -> None:
        super().__init__(processor)
        self.model_path, self.config, self.seed = str(model_path), config or VLLMConfig(), seed
        self.llm = None
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def start(self) -> None:
        """Build the engine (once). A model vLLM cannot load is one line naming it."""
        if self.llm is not None:
            return
        from vllm import LLM

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise ConfigError(
                "engine: vllm runs in one process per run (its own tensor_parallel_size spreads the model over "
                "GPUs); this run has several ranks: use engine: hf, or one process"
            )
        try:
            settings = {k: v for k, v in asdict(self.config).items() if k != "sync_bucket_mb"}  # ours, not vLLM's
            self.llm = LLM(
                self.model_path,
                **settings,
                seed=self.seed,
                # The log-probs of the distribution the tokens are drawn from (after temperature, top-k, top-p),
                # as the HF engine records them.
                logprobs_mode="processed_logprobs",
                limit_mm_per_prompt={"image": 8, "video": 0},
                # One engine process: no executor processes to start (vLLM's default for one GPU, too).
                distributed_executor_backend="uni" if self.config.tensor_parallel_size == 1 else None,
            )
        except Exception as error:  # vLLM raises many kinds: the user needs the model and the reason
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise ConfigError(f"vLLM cannot load the model {self.model_path}: {reason}") from error

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Give the engine the policy's current weights (in place; nothing is written to disk), in buckets of
        ``sync_bucket_mb`` full tensors under their HF checkpoint names, which vLLM's loader maps to its own."""
        self.start()
        for bucket in full_weight_buckets(policy, self.config.sync_bucket_mb):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(bucket)})
        # What the old weights computed must not be reused: cached prompt KV blocks and image embeddings.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def generate(
        self,
        policy: torch.nn.Module,
        prompt: dict,
        params: SamplingParams,
        logprobs: bool = False,
        images: list[list] | None = None,
        seed: int | None = None,
    ) -> Rollouts:
        """Sample from the engine's weights: call ``sync`` first whenever the policy's weights changed."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self.start()
        ids, attention = prompt["input_ids"], prompt["attention_mask"].bool()
        prompts, expected = [], []
        for row in range(ids.shape[0]):
            expected.append(ids[row][attention[row]].tolist())
            request = TokensPrompt(prompt_token_ids=self._placeholders(expected[-1]))
            if images is not None and images[row]:
                request["multi_modal_data"] = {"image": list(images[row])}
            prompts.append(request)
        sampling = dict(
            n=self.draws(params),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            stop_token_ids=self.stop_ids,
            logit_bias={token: BANNED_LOGIT_BIAS for token in self.banned} or None,
            logprobs=0 if logprobs else None,
            detokenize=False,  # the project's processor decodes, as for the HF engine
        )
        per_prompt = [
            VLLMSamplingParams(**sampling, seed=None if seed is None else (seed + row) % 2**31)
            for row in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, per_prompt, use_tqdm=False)
        for row, output in enumerate(outputs):
            if list(output.prompt_token_ids) != expected[row]:
                raise RuntimeError(
                    f"vLLM expanded prompt {row} into {len(output.prompt_token_ids)} tokens where the processor made "
                    f"{len(expected[row])}: its image processing differs from the project's processor"
                )
        samples = [sample for output in outputs for sample in output.outputs]
        width = max(1, max(len(sample.token_ids) for sample in samples))
        response = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        sampled_logprobs = torch.zeros(len(samples), width) if logprobs else None
        for row, sample in enumerate(samples):
            response[row, : len(sample.token_ids)] = torch.tensor(sample.token_ids, dtype=torch.long)
            if logprobs:
                values = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
                sampled_logprobs[row, : len(values)] = torch.tensor(values)
        device = ids.device
        if sampled_logprobs is not None:
            sampled_logprobs = sampled_logprobs.to(device)
        return self.rollouts(ids.shape[0], response.to(device), params.n, sampled_logprobs)

    def _placeholders(self, ids: list[int]) -> list[int]:
        """The prompt as vLLM takes it: each image's run of ``<|image_pad|>`` tokens back to the one placeholder.

        vLLM expands each placeholder itself, from the image it processes; ``generate`` checks that its expansion
        gives back exactly the processor's ids.
        """
        pad = self.image_token_id
        return [token for i, token in enumerate(ids) if token != pad or i == 0 or ids[i - 1] != pad]

    def close(self) -> None:
        """Release the engine and its memory (the next ``start`` builds a new one)."""
        if self.llm is None:
            return
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
