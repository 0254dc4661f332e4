"""MathVista scoring on rows in the ``AI4Math/MathVista`` schema, with a deterministic answer extraction.

The official pipeline asks GPT-4 to pull an answer out of free text, then
normalises it (a letter indexes the choices, otherwise the most similar choice
by edit distance; ``int(float(x))`` for integers; ``round(float(x), precision)``
for floats; ``str(x)`` for lists) and compares strings. Here the answer is the
last ``\\boxed{}`` (or a short bare response), and a response that matches no
choice is wrong rather than mapped to the nearest one. See docs/grading.md.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence

from vlm_post.rewards.expression import MAX_CHARS, NeedsSympy, NotMath, TooBig, TooComplex, evaluate, parse
from vlm_post.rewards.extract import extract_boxed
from vlm_post.rewards.math_equal import math_equal
from vlm_post.rewards.normalize import clean_answer, normalize_answer, strip_units
from vlm_post.rewards.stats import grading_stats
from vlm_post.rewards.sympy_pool import DEFAULT_TIMEOUT_S

MAX_BARE_ANSWER = 64  # a response without a box counts as the answer itself only when it is this short
# "B", "(B)", "B.", "B)", "(B) 24", "B. 24", "B: 24", "Option B", "choice (B): 24"
_LETTER_FORM = re.compile(
    r"(?:(?:option|choice|answer)\s*:?\s*)?\(?([A-Za-z])\)?(?:[.:)]\s*(.*)|\s+(.+)|)", re.IGNORECASE | re.DOTALL
)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)


def response_answer(response: object) -> str | None:
    """The answer a response gives: its last ``\\boxed{}``; without a box, what follows a final
    "answer is"/"Answer:", or the whole response when it is short. None when there is none."""
    if not isinstance(response, str):
        return None
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed
    text = response.strip()
    tail = _ANSWER_IS.search(text[-200:])
    if tail:
        return tail.group(1).strip()
    return text if 0 < len(text) <= MAX_BARE_ANSWER and "\n" not in text else None


def choice_index(
    answer: str, choices: Sequence[str], *, by_value: bool = True, timeout_s: float | None = None
) -> int | None:
    """Which choice ``answer`` picks, or None when it picks none or contradicts itself (``(A) 24`` when
    A is not 24). In order: a choice's exact text; an upper-case option letter (``B``, ``(B)``,
    ``B. 24``); a choice's text up to case, spaces and ``$``/``\\text{}``; a lower-case letter; and
    (``by_value``) ``math_equal`` to exactly one distinct choice.

    Choice texts can themselves be letters: with ``['A', 'B', ...]`` the answer ``B`` is the text "B"
    (the same choice), and with ``['(c)', '(a)', '(e)', '(d)', '(b)']`` the answer ``E`` is option E,
    "(b)", while ``(e)`` is the text "(e)".
    """
    choices = [str(c) for c in choices]
    if not normalize_answer(answer):
        return None
    for index, choice in enumerate(choices):
        if choice.strip() == answer.strip():
            return index
    form = _LETTER_FORM.fullmatch(clean_answer(answer))
    letter = form.group(1) if form and ord(form.group(1).upper()) - 65 < len(choices) else None
    if letter is not None and letter.isupper():
        return _by_letter(form, choices, by_value, timeout_s)
    key = normalize_answer(answer)
    by_text = [i for i, c in enumerate(choices) if normalize_answer(c) == key]
    if by_text:
        return by_text[0]
    if letter is not None:
        return _by_letter(form, choices, by_value, timeout_s)
    if by_value and len(answer) <= MAX_CHARS:
        hits = _equal_choices(answer, choices, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        if hits and len({normalize_answer(choices[i]) for i in hits}) == 1:
            return hits[0]
    return None


def _equal_choices(answer: str, choices: list[str], timeout_s: float) -> list[int]:
    """The choices ``math_equal`` to ``answer``, all within one ``timeout_s``: five choices against an answer
    that makes sympy run away take one timeout, not five."""
    deadline = time.monotonic() + timeout_s
    return [i for i, c in enumerate(choices) if math_equal(answer, c, timeout_s=max(0.0, deadline - time.monotonic()))]


def _by_letter(form: re.Match, choices: list[str], by_value: bool, timeout_s: float | None) -> int | None:
    index = ord(form.group(1).upper()) - 65
    rest = (form.group(2) or form.group(3) or "").strip()
    if rest:  # "(B) 24": the text must name the same choice
        named = choice_index(rest, choices, by_value=by_value, timeout_s=timeout_s)
        if named is None or normalize_answer(choices[named]) != normalize_answer(choices[index]):
            return None
    return index


def number_value(text: str) -> float | None:
    """The float value of a constant answer (``12``, ``\\frac{3}{2}``, ``2\\sqrt{2}``), or None. No sympy."""
    try:
        value = evaluate(parse(text))
    except (NotMath, TooComplex, NeedsSympy, TooBig, OverflowError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _list_items(text: str) -> list[str]:
    body = text.strip()
    if body[:1] in "[(" and body[-1:] in "])":
        body = body[1:-1]
    return [item.strip() for item in body.split(",") if item.strip()]


def mathvista_correct(response: str, example: Mapping) -> bool:
    """Whether ``response`` answers the MathVista row ``example`` (keys: question_type, answer_type,
    answer, choices, precision, unit) correctly. Never raises."""
    try:
        answer = response_answer(response)
        return answer is not None and answer_correct(answer, example)
    except Exception:  # noqa: BLE001 - the grader never raises on model output
        grading_stats().add("errors")
        return False


def answer_correct(answer: str, row: Mapping, *, timeout_s: float | None = None) -> bool:
    """Whether an already extracted ``answer`` is right for the MathVista row ``row``; may raise on a malformed row."""
    gold = str(row.get("answer", "")).strip()
    choices = list(row.get("choices") or [])
    if row.get("question_type") == "multi_choice" and choices:
        picked = choice_index(answer, choices, timeout_s=timeout_s)
        return picked is not None and normalize_answer(choices[picked]) == normalize_answer(gold)
    text = strip_units(clean_answer(answer), row.get("unit"))
    answer_type = row.get("answer_type")
    if answer_type == "integer":
        value, target = number_value(text), number_value(gold)
        return (
            value is not None
            and target is not None
            and abs(value - round(value)) < 1e-9
            and round(value) == round(target)
        )
    if answer_type == "float":
        value, target = number_value(text), number_value(gold)
        precision = row.get("precision")
        digits = 2 if precision is None or (isinstance(precision, float) and math.isnan(precision)) else int(precision)
        return value is not None and target is not None and round(value, digits) == round(target, digits)
    if answer_type == "list":
        items, targets = _list_items(text), _list_items(gold)
        return len(items) == len(targets) and all(_item_equal(a, b) for a, b in zip(items, targets))
    return math_equal(text, gold, timeout_s=timeout_s)


def _item_equal(item: str, target: str) -> bool:
    value, goal = number_value(item), number_value(target)
    if value is not None and goal is not None:
        return math.isclose(value, goal, rel_tol=1e-9, abs_tol=1e-9)
    return normalize_answer(item) == normalize_answer(target)
