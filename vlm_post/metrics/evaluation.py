"""The per-data-set metrics every evaluation reports, as one torchmetrics collection (synced across ranks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric, Metric, MetricCollection

from vlm_post.metrics.diversity import AnswerDiversity
from vlm_post.metrics.entropy import TokenEntropy
from vlm_post.metrics.majority import MajorityAtK
from vlm_post.metrics.pass_at_k import PassAtK


class EvalMetrics(MetricCollection):
    """Everything one data set reports.

    - ``accuracy``: greedy accuracy when greedy decoding is on, mean@n otherwise;
      ``greedy_accuracy`` and ``mean_accuracy`` (mean@n) separately;
    - ``pass@k`` for each k (unbiased estimator, over the n samples), and ``maj@k`` (majority vote of k samples'
      answers, averaged over k-subsets like pass@k; see metrics/majority.py);
    - ``entropy``: token-mean full-vocabulary entropy of the sampled responses;
    - ``mean_distinct_answers``, ``share_multiple_answers``: answer diversity over the n samples;
    - ``format_rate`` (a ``\\boxed{}`` answer was given) and ``response_length`` (tokens),
      over the samples, or over greedy answers when n = 0.
    """

    def __init__(self, pass_k: Sequence[int], greedy: bool = True) -> None:
        metrics: dict[str, Metric] = {"format_rate": MeanMetric(), "response_length": MeanMetric()}
        if greedy:
            metrics["greedy_accuracy"] = MeanMetric()
        metrics.update(mean_accuracy=MeanMetric(), entropy=TokenEntropy(), diversity=AnswerDiversity())
        if pass_k:
            metrics["pass_at_k"] = PassAtK(pass_k)
            metrics["majority_at_k"] = MajorityAtK(pass_k)
        super().__init__(metrics, compute_groups=False)
        self.greedy = greedy

    def update_from(
        self,
        greedy_correct: Sequence[bool] | None,
        greedy_formatted: Sequence[bool] | None,
        greedy_lengths: torch.Tensor | None,
        sample_correct: torch.Tensor,
        sample_formatted: torch.Tensor,
        sample_lengths: torch.Tensor,
        answers: Sequence[Sequence[str | None]],
        token_entropy: torch.Tensor | None = None,
        entropy_mask: torch.Tensor | None = None,
    ) -> None:
        """``sample_*`` are (problems, n); with n = 0 only the greedy fields count."""
        device = self["format_rate"].device
        as_float = lambda values: torch.as_tensor(values, dtype=torch.float32).flatten().to(device)  # noqa: E731
        if greedy_correct is not None:
            self["greedy_accuracy"].update(as_float(greedy_correct))
        sampled = sample_correct.numel() > 0
        if sampled:
            self["mean_accuracy"].update(as_float(sample_correct))
            self["diversity"].update(answers)
            if "pass_at_k" in self:
                self["pass_at_k"].update(sample_correct.bool().to(device))
                self["majority_at_k"].update(answers, sample_correct.bool().tolist())
            if token_entropy is not None:
                self["entropy"].update(token_entropy.to(device), entropy_mask.to(device))
        self["format_rate"].update(as_float(sample_formatted if sampled else greedy_formatted))
        self["response_length"].update(as_float(sample_lengths if sampled else greedy_lengths))

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, metric in self.items(keep_base=True, copy_state=False):
            if getattr(metric, "update_count", 1) == 0:
                continue  # e.g. no samples drawn (n = 0): nothing to report
            value = metric.compute()
            out.update(value if isinstance(value, dict) else {name: value})
        if "greedy_accuracy" in out:
            out["accuracy"] = out["greedy_accuracy"]
        elif "mean_accuracy" in out:
            out["accuracy"] = out["mean_accuracy"]
        order = ["accuracy", "greedy_accuracy", "mean_accuracy"]
        order += sorted((k for k in out if k.startswith("pass@")), key=lambda k: int(k[5:]))
        order += sorted((k for k in out if k.startswith("maj@")), key=lambda k: int(k[4:]))
        order += ["entropy", "mean_distinct_answers", "share_multiple_answers", "format_rate", "response_length"]
        return {key: out[key] for key in order if key in out}
