"""Metrics (torchmetrics, synced across ranks)."""

from vlm_post.metrics.evaluation import EvalMetrics

__all__ = ["EvalMetrics"]
