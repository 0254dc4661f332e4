"""Answer extraction: the content of the last ``\\boxed{}`` (or ``\\fbox{}``), nested braces included."""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}``; an inner box is unwrapped. None when there is none."""
    if not isinstance(text, str):
        return None
    found = None
    for match in _BOX.finditer(text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            char = text[index]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    if found is None or match.start() >= found[1]:  # skip boxes nested in the last one
                        found = (text[start:index], index)
                    break
    if found is None:
        return None
    inner = found[0].strip()
    nested = extract_boxed(inner)
    return nested if nested is not None and _BOX.match(inner) else inner
