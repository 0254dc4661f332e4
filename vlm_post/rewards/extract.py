"""Answer extraction: the content of the last ``\\boxed{}`` (or ``\\fbox{}``), nested braces included.

One pass over the brace tokens only (found by a regex), so a 100k-character
response with thousands of unclosed boxes costs milliseconds, not a quadratic scan.
"""

from __future__ import annotations

import re

# A box opener, an escaped brace (not structure: ``\{1, 2\}`` is a set), or a plain brace.
_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")


def extract_boxed(text: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}`` / ``\\fbox{...}``, stripped.

    ``\\boxed {x}`` (space before the brace) counts; a box inside the last box is
    unwrapped (``\\boxed{x = \\boxed{7}}`` gives ``7``); an unclosed box is ignored.
    None when there is no closed box. Never raises.
    """
    if not isinstance(text, str):
        return None
    stack: list[int | None] = []  # per open brace: the content start if it opened a box, else None
    closed: list[tuple[int, int]] = []  # (content start, content end) of every closed box, in closing order
    for token in _BRACE_TOKENS.finditer(text):
        piece = token.group()
        if piece.startswith("\\") and len(piece) == 2:  # \{ or \}
            continue
        if piece.endswith("{"):
            stack.append(token.end() if len(piece) > 1 else None)
        elif stack:
            start = stack.pop()
            if start is not None:
                closed.append((start, token.start()))
        # a stray "}" with nothing open is ignored
    if not closed:
        return None
    # The box that closes last is outermost in its nest, so it is the last top-level box. Boxes that
    # close just before it and opened after it are inside it; the last of those is the box inside
    # the box, and so on down: one pass, however deep the nesting.
    index = len(closed) - 1
    while index > 0 and closed[index - 1][0] > closed[index][0]:
        index -= 1
    start, end = closed[index]
    return text[start:end].strip()
