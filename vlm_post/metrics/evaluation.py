"""The per-dataset metrics every evaluation reports, as one torchmetrics collection."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, MetricCollection


class EvalMetrics(MetricCollection):
    """accuracy (greedy when n=1, mean@n otherwise), format_rate (a ``\\boxed{}`` answer was given), response_length."""

    def __init__(self) -> None:
        super().__init__({"accuracy": MeanMetric(), "format_rate": MeanMetric(), "response_length": MeanMetric()})

    def update_from(self, correct: list[bool], formatted: list[bool], lengths: torch.Tensor) -> None:
        self["accuracy"].update(torch.tensor(correct, dtype=torch.float32, device=lengths.device))
        self["format_rate"].update(torch.tensor(formatted, dtype=torch.float32, device=lengths.device))
        self["response_length"].update(lengths.float())
