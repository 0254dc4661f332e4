"""``grade``: the one entry point the evaluator and the accuracy reward call on a response and an Example.

MathVista examples (``example.extra["question_type"]`` is set) are scored with
MathVista's semantics (``mathvista_correct``); everything else with
``math_equal`` against the answer, after mapping a choice letter to its text.
A response must box its answer: no ``\\boxed{}`` is (False, None), which the
metrics count as "no answer" for the format rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_post.rewards.extract import extract_boxed
from vlm_post.rewards.math_equal import NUMERIC_REL_TOL, math_equal
from vlm_post.rewards.mathvista import answer_correct, choice_index
from vlm_post.rewards.normalize import normalize_answer
from vlm_post.rewards.stats import grading_stats

if TYPE_CHECKING:  # importing vlm_post.data would import torch and datasets: keep `import vlm_post.rewards` cheap
    from vlm_post.data.schema import Example

__all__ = ["NUMERIC_REL_TOL", "grade", "is_mathvista", "math_equal", "mathvista_row", "normalize_answer"]


def is_mathvista(example: Example) -> bool:
    return bool((getattr(example, "extra", None) or {}).get("question_type"))


def mathvista_row(example: Example) -> dict:
    """The ``AI4Math/MathVista`` row fields that scoring reads, rebuilt from an Example."""
    return {
        "question_type": example.extra["question_type"],
        "answer_type": example.answer_type,
        "answer": example.answer,
        "choices": example.choices,
        "precision": example.precision,
        "unit": example.unit,
    }


def grade(
    response: str, example: Example, *, rel_tol: float | None = None, timeout_s: float | None = None
) -> tuple[bool, str | None]:
    """(correct, extracted answer) for a full model response. Never raises.

    ``rel_tol`` is ``math_equal``'s numeric tolerance (MathVista rows use their own ``precision``
    instead). ``timeout_s`` bounds the call's symbolic comparison: one ``math_equal``, or for a MathVista
    multiple-choice row one match of the answer against all the choices.
    """
    extracted = extract_boxed(response)
    if extracted is None:
        return False, None
    try:
        if is_mathvista(example):
            return answer_correct(extracted, mathvista_row(example), timeout_s=timeout_s), extracted
        if example.choices:  # a letter or a choice's exact text: cheap, and settles "(B)" / "B. 48"
            picked = choice_index(extracted, example.choices, by_value=False)
            if picked is not None:
                return math_equal(
                    example.choices[picked], example.answer, rel_tol=rel_tol, timeout_s=timeout_s
                ), extracted
        return math_equal(extracted, example.answer, rel_tol=rel_tol, timeout_s=timeout_s), extracted
    except Exception:  # noqa: BLE001 - the grader never raises on model output
        grading_stats().add("errors")
        return False, extracted
