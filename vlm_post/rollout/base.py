"""The rollout interface: RL, on-policy distillation and evaluation all sample through it.

An engine turns a batch of prompts (the processor's outputs) into ``n``
responses per prompt. The HF ``generate`` engine is the reference; a vLLM or
remote engine implements the same ``generate`` and owns its own weight sync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vlm_post.ranges import NonNegativeFloat, NonNegativeInt, PositiveFraction, PositiveInt, check_ranges


@dataclass
class SamplingParams:
    """How to sample: ``n`` responses per prompt (the GRPO group in RL). ``temperature == 0`` is greedy."""

    n: PositiveInt = 1
    temperature: NonNegativeFloat = 1.0
    top_p: PositiveFraction = 1.0
    top_k: NonNegativeInt = 0
    max_new_tokens: PositiveInt = 256

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


class RolloutEngine(ABC):
    @abstractmethod
    def generate(
        self, policy: torch.nn.Module, prompt: dict, params: SamplingParams, logprobs: bool = False
    ) -> Rollouts:
        """Sample ``params.n`` responses for each prompt in ``prompt`` (left-padded processor outputs).

        ``logprobs``: also report the sampler's log-probs (``Rollouts.logprobs``). Off by default, as
        recording them costs every decode step a logsumexp over the vocabulary.
        """
