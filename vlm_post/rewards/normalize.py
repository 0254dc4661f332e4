"""Cheap, pure-string clean-up of answers: what both the grader and the answer-diversity count start from.

``clean_answer`` removes presentation (``$``, ``\\text{}``, spacing commands,
degree marks, a leading ``x =``, a trailing period) and spells unicode math the
LaTeX way, keeping spaces and case so the expression parser can still read it.
``normalize_answer`` is that plus no whitespace and lower case: the key under
which two answers count as the same surface answer.
"""

from __future__ import annotations

import re

_TEXT_WRAPPER = re.compile(r"\\(?:text|textrm|textit|textbf|textnormal|mathrm|mathit|mathbf|mbox|operatorname)\s*\{")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|\\displaystyle|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|~")
# "(?<!\s)": a match starts where a run of spaces starts, not at each of its spaces; "\*?\s*\\degree" tried
# at every space of a long run was quadratic (40,000 spaces: 2 s under the GIL, stalling every grading thread).
_DEGREES = re.compile(
    r"(?:\*|(?<!\s))\s*\\degree(?![a-zA-Z])|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\textdegree(?![a-zA-Z])"
)
_UNICODE = {
    "π": "\\pi ",
    "×": "\\times ",
    "·": "\\cdot ",
    "⋅": "\\cdot ",
    "÷": "\\div ",
    "−": "-",
    "–": "-",
    "∞": "\\infty ",
    "≈": "\\approx ",
    "²": "^2",
    "³": "^3",
    "，": ",",
    "：": ":",
}
_UNICODE_CHARS = re.compile("|".join(map(re.escape, _UNICODE)))
# "√15" means sqrt(15) in plain text, unlike LaTeX's "\sqrt15" = sqrt(1)*5.
_UNICODE_ROOT = re.compile(r"√\s*(\d+(?:\.\d+)?|[a-zA-Z])")
# "x =", "AB =", "x_1 =", "m\angle ABC =", "x \in": a name, not an expression, on the left of the first "=".
_NAME_PREFIX = re.compile(r"^\s*(?:m\s*)?(?:\\angle\s*)?[A-Za-z][A-Za-z0-9_{}\s]{0,15}(?:=(?!=)|\\in(?![a-zA-Z]))")
_MIXED_NUMBER = re.compile(r"(-?)(\d+)\s*\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")  # 1\frac{1}{2} is 1.5
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PAREN_LETTER = re.compile(r"\(([a-z])\)")

_UNITS = (
    r"mm|cm|km|m|in|inch|inches|ft|feet|foot|yd|yards?|mi|miles?|units?|sq|square|cubic|degrees?|deg|"
    r"g|kg|mg|lbs?|pounds?|oz|s|secs?|seconds?|mins?|minutes?|h|hrs?|hours?|days?|weeks?|months?|years?|yrs?|"
    r"ml|mL|l|L|liters?|litres?|meters?|metres?|centimeters?|kilometers?|millimeters?|dollars?|cents?|"
    r"mph|kph|N|J|W|V|kW|Hz|percent"
)
# Trailing unit words right after a number, a closing bracket or \pi (spaces allowed), with an
# optional power or "/unit"; "R, D, N" keeps its N.
# Each unit must end at a non-letter, so a run of letters matches one way only (no backtracking blow-up).
_UNIT = rf"(?:{_UNITS})(?![a-zA-Z])"
_TRAILING_UNITS = re.compile(
    rf"(?:(?<=[\d}}).\]])|(?<=\\pi))\s*(?:{_UNIT}(?:\s*\^\s*\{{?[23]\}}?|[23])?(?:\s*/\s*{_UNIT})?\s*\.?\s*)+$"
)
_UNIT_TAIL = 64  # units are short: only the tail is searched, so the cost does not grow with the text
_TRAILING_CJK = re.compile(r"(?<=[\d}\)])\s*[\u4e00-\u9fff]+\s*$")  # 海里, 米, 厘米 ...


def clean_answer(answer: object) -> str:
    """Presentation stripped, unicode spelled as LaTeX; spaces and case kept. Pure string work."""
    text = "" if answer is None else str(answer)
    text = _UNICODE_ROOT.sub(r"\\sqrt{\1}", text).replace("√", "\\sqrt")
    text = _UNICODE_CHARS.sub(lambda m: _UNICODE[m.group()], text)
    text = _unwrap_text(text)
    text = text.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    text = _DEGREES.sub("", _SPACING.sub(" ", text))
    text = text.replace("{,}", "").replace("\\%", "%")
    text = _NAME_PREFIX.sub("", text, count=1).strip()
    text = text.rstrip(".").strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    mixed = _MIXED_NUMBER.fullmatch(text)
    if mixed:
        sign, whole, numerator, denominator = mixed.groups()
        text = f"{sign}({whole} + \\frac{{{numerator}}}{{{denominator}}})"
    return text


def _unwrap_text(text: str, limit: int = 16) -> str:
    """``\\text{160√{3} m}`` -> ``160√{3} m``: the wrapper goes, the content (nested braces included) stays."""
    for _ in range(limit):  # a bound, not a loop over arbitrary model output
        match = _TEXT_WRAPPER.search(text)
        if not match:
            return text
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:  # unclosed: drop the wrapper, keep the rest
            return text[: match.start()] + text[match.end() :]
        text = text[: match.start()] + text[match.end() : end - 1] + text[end:]
    return text


def normalize_answer(text: object) -> str:
    """The surface form two answers share when they are the same answer: no spaces, lower case.

    ``"x = 30^\\circ"``, ``"30°"`` and ``"$30$."`` all give ``"30"``; ``"(B)"`` gives ``"b"``.
    Meant for counting distinct answers, so it is pure string work and cheap.
    """
    text = re.sub(r"\s+", "", clean_answer(text)).lower()
    match = _PAREN_LETTER.fullmatch(text)
    return match.group(1) if match else text


def strip_units(text: str, unit: str | None = None) -> str:
    """``text`` without trailing units (``"20 cm"``, ``"5 \\text{ cm}^2"``, ``"3 years"``, ``"20海里"``).

    ``unit`` (e.g. a MathVista row's unit) is stripped first when the text ends with it.
    """
    text = text.strip()
    if unit and text.lower().endswith(unit.strip().lower()) and len(text) > len(unit.strip()):
        text = text[: len(text) - len(unit.strip())].strip()
    tail = max(0, len(text) - _UNIT_TAIL)
    match = _TRAILING_UNITS.search(text, tail) or _TRAILING_CJK.search(text, tail)
    stripped = text[: match.start()].strip() if match else text
    return stripped or text
