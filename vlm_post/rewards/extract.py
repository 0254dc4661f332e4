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
    # The box that closes last is outermost in its nest (an outer box closes after its inner ones),
    # so "the last top-level box" is simply the last box to close.
    last: tuple[int, int] | None = None
    for token in _BRACE_TOKENS.finditer(text):
        piece = token.group()
        if piece.startswith("\\") and len(piece) == 2:  # \{ or \}
            continue
        if piece.endswith("{"):
            stack.append(token.end() if len(piece) > 1 else None)
        elif stack:
            start = stack.pop()
            if start is not None:
                last = (start, token.start())
        # a stray "}" with nothing open is ignored
    if last is None:
        return None
    inner = text[last[0] : last[1]].strip()
    nested = extract_boxed(inner)
    return nested if nested is not None else inner
