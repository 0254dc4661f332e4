"""``math_equal``: are two answers the same, symbolically or numerically? Never raises, always bounded in time.

Order of work, cheapest first:

1. clean both (``clean_answer``), compare as strings; drop a leading chain
   (``5\\sqrt{3} \\approx 8.66`` -> ``8.66``) and trailing units, compare again;
2. lists element by element (``[...]``, ``(...)`` in order; ``\\{...\\}``, ``a, b``, ``a or b`` as sets);
3. parse (``expression.parse``) and, for constants, compare float values within
   ``rel_tol`` (fractions, decimals, radicals, pi, powers: microseconds, no sympy);
4. only expressions with variables (or complex values) go to sympy, in a worker
   process with a hard timeout (``sympy_pool``).

Inputs that are too long, too deeply nested or too large (``9^{9^{9^9}}``,
``10000!``) are rejected before step 3/4: compared as strings only, counted as
``rejected``. A comparison that times out is wrong and counted as ``timeouts``.

The time bound is per call: ``timeout_s`` counts from the call, and includes
waiting for a free sympy worker. Everything this process computes itself is
bounded by the input's length (``MAX_CHARS``): no big-integer arithmetic here,
where it would hold the GIL and stall every grading thread.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from fractions import Fraction

from vlm_post.rewards.expression import MAX_CHARS, NeedsSympy, NotMath, TooBig, TooComplex, evaluate, parse, screen
from vlm_post.rewards.extract import extract_boxed
from vlm_post.rewards.normalize import clean_answer, strip_units
from vlm_post.rewards.stats import grading_stats
from vlm_post.rewards.sympy_pool import DEFAULT_TIMEOUT_S, sympy_pool

NUMERIC_REL_TOL = 1e-4  # |a - b| <= 1e-4 * max(|a|, |b|): "8.66" matches 5\sqrt{3} = 8.66025..., "8.7" does not
NUMERIC_ABS_TOL = 1e-9  # so that 0 matches 0.0 and 1e-12
MAX_LIST_ITEMS = 16
MAX_SET_ITEMS = 8  # unordered matching compares every pair
MAX_EXACT_SHIFT = 1000  # exponents further apart than this: values 10^700 apart at least (digits <= MAX_CHARS)
CACHE_SIZE = 1 << 16  # recent (prediction, reference) pairs: GRPO groups repeat the same answers

_TRUE, _FALSE, _TIMEOUT, _REJECTED = "true", "false", "timeout", "rejected"
_RELATION = re.compile(r"=|\\approx|\\simeq|\\equiv")
_OR = re.compile(r"\s+(?:or|and)\s+|\\(?:lor|quad)\s*")  # "x = 2 or x = 3" lists two solutions
_LITERAL = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?")  # a number token of expression.py
_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_cache: OrderedDict[tuple, str] = OrderedDict()
_cache_lock = threading.Lock()


def math_equal(
    prediction: object, reference: object, *, rel_tol: float | None = None, timeout_s: float | None = None
) -> bool:
    """True when ``prediction`` and ``reference`` denote the same answer.

    ``prediction`` may still carry ``\\boxed{}`` or ``x = ...``. Numbers compare
    within ``rel_tol`` (default ``NUMERIC_REL_TOL``). The whole call, waiting for a
    sympy worker included, returns within about ``timeout_s`` (default
    ``sympy_pool.DEFAULT_TIMEOUT_S``), as a timeout (wrong) if need be; only the
    first symbolic comparison of a process also waits for the pool's first worker
    to start (``sympy_pool().warm_up()`` avoids it). Never raises: anything unreadable is wrong.
    """
    stats = grading_stats()
    stats.add("comparisons")
    if prediction is None or reference is None:
        return False
    rel_tol = NUMERIC_REL_TOL if rel_tol is None else float(rel_tol)
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    try:
        prediction, reference = str(prediction), str(reference)
        key = (prediction, reference, rel_tol)
        with _cache_lock:
            outcome = _cache.get(key)
            if outcome is not None:
                _cache.move_to_end(key)
        if outcome is not None:
            stats.add("cached")
            if outcome == _REJECTED:  # still a comparison that was rejected
                stats.add("rejected")
        else:
            comparison = _Comparison(rel_tol, time.monotonic() + timeout_s)
            outcome = comparison.outcome(prediction, reference)
            # A timeout is not cached: it may come from a spent batch budget or a busy pool, not the input.
            if outcome != _TIMEOUT and len(prediction) + len(reference) < 2000:
                with _cache_lock:
                    _cache[key] = outcome
                    if len(_cache) > CACHE_SIZE:
                        _cache.popitem(last=False)
            if outcome in (_TIMEOUT, _REJECTED):
                stats.add("timeouts" if outcome == _TIMEOUT else "rejected")
            elif not comparison.used_sympy:
                stats.add("fast")
        return outcome == _TRUE
    except Exception:  # noqa: BLE001 - the grader never raises on model output
        stats.add("errors")
        return False


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def _split_top_level(text: str) -> tuple[list[str], bool] | None:
    """Items of ``[1, 2]`` / ``(1, 2)`` (ordered) or ``\\{1, 2\\}`` / ``1, 2`` / ``1 or 2`` (unordered: a set of
    solutions); None when there is no top-level comma."""
    body, ordered = _OR.sub(", ", text.strip()), False
    if body.startswith("\\{") and body.endswith("\\}"):
        body = body[2:-2]
    elif len(body) >= 2 and body[0] + body[-1] in ("[]", "()") and _balanced(body[1:-1]):
        body, ordered = body[1:-1], True
    items, depth, start = [], 0, 0
    for index, char in enumerate(body):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(body[start:index])
            start = index + 1
    if not items:
        return None
    items.append(body[start:])
    return [item.strip() for item in items], ordered


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if depth < 0:
            return False
    return depth == 0


def _percent(text: str) -> tuple[str, bool]:
    stripped = text.rstrip()
    if stripped.endswith("%"):
        return stripped[:-1].rstrip(), True
    return text, False


class _Comparison:
    def __init__(self, rel_tol: float, deadline: float):
        self.rel_tol, self.deadline = rel_tol, deadline
        self.used_sympy = False

    def outcome(self, prediction: str, reference: str) -> str:
        boxed = extract_boxed(prediction)
        pred, ref = clean_answer(boxed if boxed is not None else prediction), clean_answer(reference)
        if not pred or not ref:
            return _FALSE
        if _squash(pred) == _squash(ref):
            return _TRUE
        if len(pred) > MAX_CHARS or len(ref) > MAX_CHARS:  # no answer is this long: not worth parsing
            return _REJECTED
        pred, ref = strip_units(pred), strip_units(ref)  # "[2014, 2016] cm", "5 \sqrt{3} \approx 8.66 cm"
        split_p, split_r = _split_top_level(pred), _split_top_level(ref)
        if split_p is not None or split_r is not None:  # each item is compared as an answer of its own
            items_p, ordered_p = split_p or ([pred], False)
            items_r, ordered_r = split_r or ([ref], False)
            return self._lists(items_p, items_r, ordered=ordered_p or ordered_r)
        if not _RELATION.search(ref):  # "x = 5\sqrt{3} \approx 8.66": the last value is the answer
            pred = strip_units(_RELATION.split(pred)[-1].strip())
        if _squash(pred) == _squash(ref):
            return _TRUE
        letter_p, letter_r = _LETTER.fullmatch(pred), _LETTER.fullmatch(ref)
        if letter_p and letter_r:  # choice letters: "(B)" is "B"
            return _TRUE if letter_p.group(1).lower() == letter_r.group(1).lower() else _FALSE
        return self._values(pred, ref)

    def _lists(self, items_p: list[str], items_r: list[str], ordered: bool) -> str:
        if len(items_p) != len(items_r):
            return _FALSE
        if len(items_r) > (MAX_LIST_ITEMS if ordered else MAX_SET_ITEMS):
            return _REJECTED
        if ordered:
            for a, b in zip(items_p, items_r):
                result = self.outcome(a, b)
                if result != _TRUE:
                    return result
            return _TRUE
        unmatched = list(items_r)  # a set: every predicted item matches a distinct reference item
        for a in items_p:
            match = next((b for b in unmatched if self.outcome(a, b) == _TRUE), None)
            if match is None:
                return _FALSE
            unmatched.remove(match)
        return _TRUE

    def _values(self, pred: str, ref: str) -> str:
        pred, pct_p = _percent(pred)
        ref, pct_r = _percent(ref)
        try:
            tree_p, tree_r = parse(pred), parse(ref)
        except TooComplex:
            return _REJECTED
        except NotMath:
            return _FALSE  # words, ratios, inequalities: the string comparison above was the test
        value_p, value_r = _constant(tree_p), _constant(tree_r)
        if isinstance(value_p, float) and isinstance(value_r, float):
            candidates = [(value_p, value_r)]
            if pct_p != pct_r:  # "50%" against "0.5" or "50"
                candidates.append((value_p / 100, value_r) if pct_p else (value_p, value_r / 100))
            return _TRUE if any(self._close(a, b) for a, b in candidates) else _FALSE
        if value_p is TooBig and value_r is TooBig and tree_p[0] == tree_r[0] == "n":
            return _TRUE if self._close_exact(tree_p[1], tree_r[1]) else _FALSE  # two written numbers past floats
        if value_p is TooBig or value_r is TooBig:
            return _REJECTED if value_p is value_r else _FALSE  # a huge value never equals a normal one
        try:
            screen(tree_p)
            screen(tree_r)
        except TooComplex:
            return _REJECTED
        self.deadline += sympy_pool().wait_until_warm()  # the pool's one-off first start is not counted
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return _TIMEOUT
        grading_stats().add("sympy")
        self.used_sympy = True
        equal = sympy_pool().compare(tree_p, tree_r, self.rel_tol, remaining)
        return _TIMEOUT if equal is None else _TRUE if equal else _FALSE

    def _close_exact(self, a: str, b: str) -> bool:
        """Two decimal literals past float range (which would overflow to inf) compared exactly within ``rel_tol``.

        As (digits, exponent) pairs: ``Fraction("1e4000000")`` builds 10^4000000, seconds of big-integer
        arithmetic under the GIL, and ``1e999...9`` never finishes.
        """
        (digits_a, exponent_a), (digits_b, exponent_b) = _digits_exponent(a), _digits_exponent(b)
        if abs(exponent_a - exponent_b) > MAX_EXACT_SHIFT:
            # The digits (at most MAX_CHARS of them) cannot make up the gap: the smaller value is below
            # 10^-700 of the larger, so the relative difference is 1 up to that, within rel_tol iff rel_tol >= 1.
            return self.rel_tol >= 1
        common = min(exponent_a, exponent_b)  # both sides scaled by 10^-common: the comparison is unchanged
        x, y = digits_a * 10 ** (exponent_a - common), digits_b * 10 ** (exponent_b - common)
        return abs(x - y) <= Fraction(self.rel_tol) * max(x, y)

    def _close(self, a: float, b: float) -> bool:
        if math.isinf(a) or math.isinf(b):
            return a == b
        return math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=NUMERIC_ABS_TOL)


def _digits_exponent(literal: str) -> tuple[int, int]:
    """``"1.5e400"`` as (15, 399): the value is digits * 10^exponent, for any exponent (``Decimal`` caps them)."""
    whole, fraction, exponent = _LITERAL.fullmatch(literal).groups()
    fraction = fraction or ""
    return int(whole + fraction or "0"), int(exponent or 0) - len(fraction)


def _constant(tree: list) -> float | type | None:
    """The float value of a constant tree; ``TooBig`` (the class) when beyond floats; None when symbolic."""
    try:
        return evaluate(tree)
    except TooBig:
        return TooBig
    except (NeedsSympy, OverflowError, ValueError):
        return None
