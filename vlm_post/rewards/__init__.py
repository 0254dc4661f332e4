"""Answer extraction, grading and RL rewards: pure Python (+ sympy in a helper process), no torch, no Lightning.

Importing this package is cheap: sympy is only imported by the worker process
that ``math_equal`` starts the first time an answer needs symbolic comparison.
See docs/grading.md for what is graded how, and why.
"""

from vlm_post.rewards.extract import extract_boxed
from vlm_post.rewards.grading import grade, is_mathvista, mathvista_row
from vlm_post.rewards.math_equal import NUMERIC_REL_TOL, clear_cache, math_equal
from vlm_post.rewards.mathvista import choice_index, mathvista_correct, response_answer
from vlm_post.rewards.normalize import clean_answer, normalize_answer, strip_units
from vlm_post.rewards.reward_fns import (
    AccuracyReward,
    FormatReward,
    FunctionReward,
    MathReward,
    RewardFn,
    RewardOutput,
    WeightedSum,
    load_reward_fn,
)
from vlm_post.rewards.stats import GradingStats, grading_stats
from vlm_post.rewards.sympy_pool import DEFAULT_TIMEOUT_S, sympy_pool

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NUMERIC_REL_TOL",
    "AccuracyReward",
    "FormatReward",
    "FunctionReward",
    "GradingStats",
    "MathReward",
    "RewardFn",
    "RewardOutput",
    "WeightedSum",
    "choice_index",
    "clean_answer",
    "clear_cache",
    "extract_boxed",
    "grade",
    "grading_stats",
    "is_mathvista",
    "load_reward_fn",
    "math_equal",
    "mathvista_correct",
    "mathvista_row",
    "normalize_answer",
    "response_answer",
    "strip_units",
    "sympy_pool",
]
