"""The rollout interface: RL, on-policy distillation and evaluation all sample through it.

An engine turns a batch of prompts (the processor's outputs) into ``n``
responses per prompt. The HF ``generate`` engine is the reference; a vLLM or
remote engine implements the same ``generate`` and owns its own weight sync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from vlm_post.ranges import NonNegativeFloat, NonNegativeInt, PositiveFraction, PositiveInt, check_ranges
from vlm_post.rollout.batch import RolloutBatch


@dataclass
class SamplingParams:
    """How to sample: ``n`` responses per prompt (the GRPO group in RL). ``temperature == 0`` is greedy.

    ``engine``: what samples the training rollouts (RL's and OPD's ``rollout``): ``hf`` (``generate`` on the
    policy itself) or ``vllm`` (an engine given the policy's weights before every step's sampling; settings in
    ``model.vllm``). Evaluation names its engine in ``eval.engine`` and ``val.engine``.
    """

    n: PositiveInt = 1
    temperature: NonNegativeFloat = 1.0
    top_p: PositiveFraction = 1.0
    top_k: NonNegativeInt = 0
    max_new_tokens: PositiveInt = 256
    engine: Literal["hf", "vllm"] = "hf"

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Rollouts:
    """Responses for ``B`` prompts x ``n`` samples, row ``i`` answering prompt ``prompt_index[i]``.

    ``response_ids`` (B*n, L) are right-padded; ``response_mask`` marks real
    tokens, including the EOS token that ended a finished response. ``logprobs``
    (B*n, L) are the sampler's log-probs of the drawn tokens, under the
    distribution it drew from (after temperature, top-k and top-p), 0 on padding;
    None unless ``generate`` was asked for them, or from an engine that cannot report them.
    """

    prompt_index: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


# Tokens that only the processor may place. A sampled one makes the next forward
# fail ("Image features and image tokens do not match"), so no engine ever samples them.
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


class RolloutEngine(ABC):
    """What every engine shares: the tokens it stops at, never samples and pads with, and where a response ends."""

    def __init__(self, processor) -> None:
        self.processor = processor
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        self.banned = [vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = {tokenizer.eos_token_id} | {vocab.get(t) for t in ("<|im_end|>", "<|endoftext|>")}
        self.stop_ids = sorted(i for i in stops if i is not None)

    @abstractmethod
    def generate(
        self,
        policy: torch.nn.Module,
        prompt: dict,
        params: SamplingParams,
        logprobs: bool = False,
        images: list[list] | None = None,
        seed: int | None = None,
    ) -> Rollouts:
        """Sample ``params.n`` responses for each prompt in ``prompt`` (left-padded processor outputs).

        ``logprobs``: also report the sampler's log-probs (``Rollouts.logprobs``). Off by default, as
        recording them costs every decode step a logsumexp over the vocabulary.
        ``images``: each prompt's images as the processor got them (PIL), for an engine that processes
        images itself (vLLM); the HF engine reads the processor's pixel values from ``prompt``.
        ``seed``: for an engine with a random stream of its own (vLLM), prompt i's samples are drawn with seed
        ``seed + i``, so the same call draws the same samples again (a resumed step). The HF engine draws from
        torch's global generator, which checkpoints keep.
        """

    def sample(
        self,
        policy: torch.nn.Module,
        batch: dict,
        params: SamplingParams,
        logprobs: bool = False,
        seed: int | None = None,
    ) -> RolloutBatch:
        """``generate`` over a collated batch (prompts, images, image counts), as one ``RolloutBatch``."""
        images = [example.images for example in batch["examples"]]
        rollouts = self.generate(policy, batch["prompt"], params, logprobs=logprobs, images=images, seed=seed)
        return RolloutBatch.from_rollouts(batch["prompt"], batch["image_counts"], rollouts, params.n)

    def sleep(self) -> None:
        """Free what the engine holds of the accelerator until its next use (an engine with its own copy of the
        weights, asleep between samplings); nothing for an engine that samples from the policy itself."""

    @staticmethod
    def prompt_rows(
        prompt: dict, images: list[list] | None, seed: int | None
    ) -> list[tuple[list[int], list, int | None]]:
        """Each prompt as an engine that takes them one by one gets it: its ids without padding, its images, and its
        seed (prompt i: ``seed + i``)."""
        ids, attention = prompt["input_ids"], prompt["attention_mask"].bool()
        return [
            (
                ids[row][attention[row]].tolist(),
                list(images[row] or []) if images is not None else [],
                None if seed is None else (seed + row) % 2**31,
            )
            for row in range(ids.shape[0])
        ]

    def rollouts_from_samples(
        self, prompt: dict, samples: list[tuple[list[int], list[float]]], n: int, logprobs: bool
    ) -> Rollouts:
        """``rollouts`` of each response's token ids and, with ``logprobs``, its sampler's log-probs (``draws`` rows
        per prompt of ``prompt``, grouped by prompt), on the prompt's device."""
        width = max(1, max(len(tokens) for tokens, _ in samples))
        response = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        sampled_logprobs = torch.zeros(len(samples), width) if logprobs else None
        for row, (tokens, values) in enumerate(samples):
            response[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if logprobs:
                sampled_logprobs[row, : len(values)] = torch.tensor(values)
        device = prompt["input_ids"].device
        if sampled_logprobs is not None:
            sampled_logprobs = sampled_logprobs.to(device)
        return self.rollouts(prompt["input_ids"].shape[0], response.to(device), n, sampled_logprobs)

    @staticmethod
    def draws(params: SamplingParams) -> int:
        """Responses an engine draws per prompt: n greedy samples are one sample n times (``rollouts`` repeats it)."""
        return 1 if params.greedy else params.n

    def rollouts(self, prompts: int, response: torch.Tensor, n: int, logprobs: torch.Tensor | None) -> Rollouts:
        """``Rollouts`` of ``prompts`` x ``n`` right-padded responses (rows grouped by prompt).

        ``response`` holds ``n`` rows per prompt, or one (``draws`` of a greedy request), repeated here ``n`` times.
        A response ends at its first stop token, which is kept; everything after it is padding.
        """
        if response.shape[0] == prompts and n > 1:
            response = response.repeat_interleave(n, dim=0)
            logprobs = logprobs.repeat_interleave(n, dim=0) if logprobs is not None else None
        is_stop = torch.isin(response, torch.tensor(self.stop_ids, device=response.device))
        mask = ~((is_stop.cumsum(-1) - is_stop.long()) > 0)
        finished = is_stop.any(-1)
        if logprobs is not None:
            logprobs = logprobs.masked_fill(~mask, 0.0)
        texts = self.processor.batch_decode(response.masked_fill(~mask, self.pad_token_id), skip_special_tokens=True)
        prompt_index = torch.arange(prompts, device=response.device).repeat_interleave(n)
        return Rollouts(prompt_index, response, mask.long(), finished, texts, logprobs)
