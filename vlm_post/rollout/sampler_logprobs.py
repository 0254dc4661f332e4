"""The sampler's own log-probs of the tokens it drew, recorded during HF ``generate``.

``generate`` can return every step's scores, but that is a [rows, V] tensor per new token (gigabytes at
V = 151,936). This logits processor runs last in the chain, after the sampling warpers, and keeps one
step's scores and their log-normaliser: at each step it reads off the previous step's log-prob of the token
that was just appended to ``input_ids``, so it adds one logsumexp per step and [rows, steps] floats.

It must see the distribution the sampler draws from, so the engine passes the warpers itself
(temperature, top-k, top-p, in HF's order) before it and leaves ``generate``'s own ones neutral.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SampledLogprobs(LogitsProcessor):
    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # the last step's scores (generate makes a new tensor per step)
        self.normaliser: torch.Tensor | None = None  # their logsumexp: one [rows] vector, not a [rows, V] log-softmax
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self._pick(input_ids[:, -1]))
        self.previous, self.normaliser = scores, torch.logsumexp(scores.float(), dim=-1)
        return scores

    def _pick(self, tokens: torch.Tensor) -> torch.Tensor:
        picked = (
            self.previous.gather(-1, tokens[:, None].to(self.previous.device)).squeeze(-1).float() - self.normaliser
        )
        return picked.masked_fill(~torch.isfinite(picked), 0.0)  # padding after EOS may be a suppressed id

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """[rows, L] log-probs of ``response`` (the new tokens), L = the number of sampling steps."""
        if self.previous is not None:
            self.steps.append(self._pick(response[:, len(self.steps)]))
            self.previous = self.normaliser = None
        if not self.steps:
            return torch.zeros(response.shape, dtype=torch.float32, device=response.device)
        out = torch.stack(self.steps, dim=1)
        return out[:, : response.shape[1]]
