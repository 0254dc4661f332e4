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
import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from vlm_post.errors import ConfigError
from vlm_post.internals import shutdown_vllm_engine
from vlm_post.models.sharding import full_weight_buckets
from vlm_post.ranges import PositiveFloat, PositiveFraction, PositiveInt, check_ranges
from vlm_post.rollout.base import RolloutEngine, Rollouts, SamplingParams

# vLLM's logit bias is clamped to [-100, 100]: a banned token keeps a probability of e^-100 relative to its logit,
# which no sampler draws and greedy never picks.
BANNED_LOGIT_BIAS = -100.0
# VLLMConfig's settings that are this project's, not vLLM's engine arguments.
OURS = ("sync_bucket_mb", "server_urls", "server_wait_s", "server_timeout_s")


def fold_image_placeholders(ids: list[int], image_token_id: int) -> list[int]:
    """A prompt as vLLM takes it: each image's run of ``<|image_pad|>`` tokens back to the one placeholder.

    vLLM expands each placeholder itself, from the image it processes; the engines check that its expansion gives
    back exactly the processor's ids.
    """
    return [token for i, token in enumerate(ids) if token != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm(config: VLLMConfig | None, **engines: str) -> None:
    """One line where an engine option (``eval=``, ``val=``, ``rollout=``: its value) is ``vllm`` and vLLM cannot be
    imported in this environment. With ``config.server_urls`` the samples come from servers over HTTP: nothing needed.
    """
    if (config is not None and config.server_urls) or vllm_available():
        return
    for key, engine in engines.items():
        if engine == "vllm":
            raise ConfigError(
                f"{key}.engine: vllm, but vLLM is not installed in this environment ({sys.executable}): "
                "pip install 'vlm_post[vllm]' on a CUDA machine, or 'make setup-vllm' for the CPU build (.venv-vllm), "
                "or sample from vLLM servers (model.vllm.server_urls)"
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
        enable_sleep_mode: between samplings the engine sleeps (vLLM's level 1: its weights move to CPU memory,
            its KV cache is freed), so the update has the GPU's memory; it wakes for the next weight sync. CUDA
            only (vLLM refuses it elsewhere, in one line).
        sync_bucket_mb: the policy's weights go to the engine in buckets of about this many MB of full tensors
            (gathered bucket by bucket under FSDP2), so the sync holds one bucket at a time beside the two models.
        server_urls: server mode: sample from vLLM servers already running at these addresses (one per server,
            e.g. ``http://node7:8000``) instead of an engine in the trainer's processes; the settings above
            are then the servers' own (docs/rollout.md, "Server mode"), except ``sync_bucket_mb``.
        server_wait_s: how long the run waits for its servers to answer, at its first sampling.
        server_timeout_s: how long one request to a server may take.
    """

    tensor_parallel_size: PositiveInt = 1
    gpu_memory_utilization: PositiveFraction = 0.6
    max_model_len: PositiveInt | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    enforce_eager: bool = False
    enable_sleep_mode: bool = False
    sync_bucket_mb: PositiveFloat = 512.0
    server_urls: list[str] | None = None
    server_wait_s: PositiveFloat = 600.0
    server_timeout_s: PositiveFloat = 3600.0

    def __post_init__(self) -> None:
        check_ranges(self)


class VLLMEngine(RolloutEngine):
    def __init__(self, processor, model_path: str, config: VLLMConfig | None = None, seed: int = 0) -> None:
        super().__init__(processor)
        self.model_path, self.config, self.seed = str(model_path), config or VLLMConfig(), seed
        self.llm = None
        self.asleep = False
        self.colocated = False  # one engine per trainer rank, in the trainer's process group (``start``)
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def start(self) -> None:
        """Build the engine (once). A model vLLM cannot load is one line naming it.

        In a run of several ranks (colocated: every trainer rank holds an engine beside its shard of the policy),
        vLLM joins the trainer's process group (its ``external_launcher``): each group of ``tensor_parallel_size``
        consecutive ranks spreads one engine's model over its GPUs, and the groups sample their own prompts.
        """
        if self.llm is not None:
            return
        from vllm import LLM
        from vllm.platforms import current_platform

        tp, world, rank = self.config.tensor_parallel_size, 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if world > 1:
            if world % tp:
                raise ConfigError(
                    f"model.vllm.tensor_parallel_size {tp} does not divide the run's {world} ranks: each group of "
                    f"{tp} ranks holds one engine"
                )
            os.environ["RANK"] = str(rank)  # what external_launcher reads; Lightning's launchers may not set it
            os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
            placement = {"distributed_executor_backend": "external_launcher", "data_parallel_size": world // tp}
        else:
            # One engine process: no executor processes to start (vLLM's default for one GPU, too).
            placement = {"distributed_executor_backend": "uni" if tp == 1 else None}
        self.colocated = world > 1
        # vLLM's CPU build cannot rewind a seeded request's random generator when a chunked prefill discards the
        # token it sampled ("CPU Generator does not use offset"), which every seeded training step hits once its
        # prompts exceed one forward's token budget: there, prompts are scheduled whole.
        scheduling = {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
        try:
            settings = {k: v for k, v in asdict(self.config).items() if k not in OURS}
            self.llm = LLM(
                self.model_path,
                **settings,
                **placement,
                **scheduling,
                # The ranks of one engine draw alike; different engines draw differently.
                seed=self.seed + rank // tp,
                # The log-probs of the distribution the tokens are drawn from (after temperature, top-k, top-p),
                # as the HF engine records them.
                logprobs_mode="processed_logprobs",
                limit_mm_per_prompt={"image": 8, "video": 0},
            )
        except Exception as error:  # vLLM raises many kinds: the user needs the model and the reason
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            raise ConfigError(f"vLLM cannot load the model {self.model_path}: {reason}") from error
        self.asleep = False

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Give the engine the policy's current weights (in place; nothing is written to disk), in buckets of
        ``sync_bucket_mb`` full tensors under their HF checkpoint names, which vLLM's loader maps to its own."""
        self.start()
        if self.asleep:  # EasyR1's order: the weights' memory back first, the KV cache's once they are loaded
            self.llm.wake_up(tags=["weights"])
        for bucket in full_weight_buckets(policy, self.config.sync_bucket_mb):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(bucket)})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # What the old weights computed must not be reused: cached prompt KV blocks and image embeddings.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        """Give the GPU's memory back until the next ``sync`` (with ``enable_sleep_mode``; otherwise nothing)."""
        if self.llm is not None and self.config.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # level 1 keeps a CPU copy of the weights: ``generate`` may follow without sync
            self.asleep = True

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
        from vllm.inputs import TokensPrompt

        self.start()
        if self.asleep:
            self.llm.wake_up()
        requests, mine = self._engine_requests(self.prompt_rows(prompt, images, seed))
        prompts, per_prompt = [], []
        for tokens, row_images, row_seed in requests:
            request = TokensPrompt(prompt_token_ids=fold_image_placeholders(tokens, self.image_token_id))
            if row_images:
                request["multi_modal_data"] = {"image": row_images}
            prompts.append(request)
            per_prompt.append(self._sampling_params(params, logprobs, row_seed))
        outputs = self.llm.generate(prompts, per_prompt, use_tqdm=False)
        for row, (output, (tokens, _, _)) in enumerate(zip(outputs, requests)):
            if list(output.prompt_token_ids) != tokens:
                raise RuntimeError(
                    f"vLLM expanded prompt {row} into {len(output.prompt_token_ids)} tokens where the processor made "
                    f"{len(tokens)}: its image processing differs from the project's processor"
                )
        samples = [
            (sample.token_ids, [step[token].logprob for step, token in zip(sample.logprobs or [], sample.token_ids)])
            for output in outputs[mine]
            for sample in output.outputs
        ]
        return self.rollouts_from_samples(prompt, samples, params.n, logprobs)

    def _engine_requests(self, requests: list) -> tuple[list, slice]:
        """The requests this rank's engine serves, and which of them are this rank's own.

        The ranks of one tensor-parallel engine run the same schedule in lockstep, so each is given all of their
        prompts (each rank brought its own batch) with the same seeds, and keeps its own rows of the outputs.
        """
        if self.config.tensor_parallel_size == 1 or not self.colocated:
            return requests, slice(0, len(requests))
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        everyone: list = [None] * group.world_size
        torch.distributed.all_gather_object(everyone, requests, group=group.cpu_group)
        start = sum(len(part) for part in everyone[: group.rank_in_group])
        return [request for part in everyone for request in part], slice(start, start + len(requests))

    def _sampling_params(self, params: SamplingParams, logprobs: bool, seed: int | None):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=self.draws(params),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            stop_token_ids=self.stop_ids,
            logit_bias={token: BANNED_LOGIT_BIAS for token in self.banned} or None,
            logprobs=0 if logprobs else None,
            detokenize=False,  # the project's processor decodes, as for the HF engine
            seed=seed,
        )

    def close(self) -> None:
        """Release the engine and its memory (the next ``start`` builds a new one)."""
        if self.llm is None:
            return
        shutdown_vllm_engine(self.llm, keep_process_group=self.colocated)
        self.llm, self.asleep = None, False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
