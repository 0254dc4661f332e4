"""Grading a response against an Example: extract, normalise, compare.

Comparison is by normalised string, then by number (relative tolerance
``NUMERIC_REL_TOL``), then by multiple-choice letter against the choice text.
The grader never raises on model output: anything unparseable is simply wrong.
"""

from __future__ import annotations

import re

from vlm_post.data.schema import Example
from vlm_post.rewards.extract import extract_boxed

NUMERIC_REL_TOL = 1e-4
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """Lower-case, strip ``$``, spaces, ``\\text{}``, degree marks, a leading ``x =`` and a trailing period."""
    text = _TEXT.sub(r"\1", str(answer))
    text = text.replace("$", "").replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    text = text.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", text)
    text = re.sub(r"\s+", "", text).rstrip(".").lower()
    return text


def _number(text: str) -> float | None:
    match = re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", text.replace(",", ""))
    if match:
        return float(text.replace(",", ""))
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", text)
    if frac and float(frac.group(3)) != 0:
        value = float(frac.group(2)) / float(frac.group(3))
        return -value if frac.group(1) else value
    return None


def math_equal(prediction: str, reference: str) -> bool:
    """True when ``prediction`` and ``reference`` denote the same answer. Never raises."""
    try:
        if prediction is None or reference is None:
            return False
        boxed = extract_boxed(str(prediction))
        pred, ref = normalize_answer(boxed if boxed is not None else prediction), normalize_answer(reference)
        if not pred:
            return False
        if pred == ref:
            return True
        a, b = _number(pred), _number(ref)
        if a is not None and b is not None:
            return abs(a - b) <= NUMERIC_REL_TOL * max(1.0, abs(b))
        return False
    except Exception:
        return False


def grade(response: str, example: Example) -> tuple[bool, str | None]:
    """(correct, extracted answer) for a full model response."""
    extracted = extract_boxed(response)
    if extracted is None:
        return False, None
    if math_equal(extracted, example.answer):
        return True, extracted
    if example.choices:
        letter = normalize_answer(extracted).strip("()").upper()
        if len(letter) == 1 and "A" <= letter < chr(65 + len(example.choices)):
            return math_equal(example.choices[ord(letter) - 65], example.answer), extracted
    return False, extracted
