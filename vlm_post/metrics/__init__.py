"""Metrics (torchmetrics, synced across ranks) and the pure functions behind them."""

from vlm_post.metrics.bootstrap import bootstrap_ci, paired_bootstrap_ci, seed_problem_bootstrap_ci
from vlm_post.metrics.diversity import AnswerDiversity, distinct_answer_count
from vlm_post.metrics.entropy import TokenEntropy
from vlm_post.metrics.evaluation import EvalMetrics
from vlm_post.metrics.majority import MajorityAtK, majority_at_k, majority_at_k_per_problem
from vlm_post.metrics.pass_at_k import PassAtK, pass_at_k, pass_at_k_per_problem

__all__ = [
    "AnswerDiversity",
    "EvalMetrics",
    "MajorityAtK",
    "PassAtK",
    "TokenEntropy",
    "bootstrap_ci",
    "distinct_answer_count",
    "majority_at_k",
    "majority_at_k_per_problem",
    "paired_bootstrap_ci",
    "pass_at_k",
    "pass_at_k_per_problem",
    "seed_problem_bootstrap_ci",
]
