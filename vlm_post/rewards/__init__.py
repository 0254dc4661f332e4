"""Answer extraction and grading: pure Python, no torch, no Lightning."""

from vlm_post.rewards.extract import extract_boxed
from vlm_post.rewards.grading import grade, math_equal, normalize_answer

__all__ = ["extract_boxed", "grade", "math_equal", "normalize_answer"]
