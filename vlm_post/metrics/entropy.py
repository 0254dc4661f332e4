"""Policy entropy over sampled responses, token-mean across the whole evaluation set."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TokenEntropy(Metric):
    """Token-mean full-vocabulary entropy of the policy on its own sampled responses.

    Reported: sum over all response tokens of H(pi(. | prefix)) = -sum_v p_v log p_v,
    the exact entropy of the next-token distribution over the whole vocabulary
    (at the sampling temperature; see ``vlm_post.losses.token_logprobs_and_entropy``),
    divided by the number of response tokens in the whole set, so long
    responses weigh by their length. It is not the one-sample estimate
    -log p(sampled token) that some frameworks log: that estimate is unbiased
    only in expectation and much noisier.

    ``update(token_entropy, mask=None)`` takes per-token entropies of any shape
    and an optional boolean mask of the same shape selecting response tokens
    (prompt and padding positions False). Sums sync across ranks; ``compute``
    returns a scalar tensor, NaN when no token was seen.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("entropy_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_entropy: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        values = token_entropy.detach()
        if mask is not None:
            if mask.shape != values.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} differs from entropy shape {tuple(values.shape)}")
            values = values[mask.bool()]
        self.entropy_sum += values.double().sum().to(self.entropy_sum.device)
        self.token_count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.entropy_sum / self.token_count).float()  # 0 / 0 = NaN: nothing was seen
