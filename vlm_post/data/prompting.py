"""Turning an Example into chat messages and SFT targets.

The instruction follows the anchors' (EasyR1, verl) Geometry3K recipe: reason
inside ``<think></think>`` and put the final answer in ``\\boxed{}``, which is
what the graders extract. Images go where the question's ``<image>`` markers
are (Geometry3K writes ``<image>Find y.``), or first when it has none.
"""

from __future__ import annotations

from vlm_post.data.schema import Example

DEFAULT_INSTRUCTION = (
    "First think through the problem inside <think> </think> tags, then write the final answer inside \\boxed{}."
)
# `{answer}` is replaced by the example's answer; no other braces are interpreted.
DEFAULT_ANSWER_TEMPLATE = "<think></think>\\boxed{{answer}}"
IMAGE_MARKER = "<image>"


def build_messages(example: Example, instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """The user turn: images and question text interleaved, then the instruction.

    When the ``<image>`` markers do not match the number of images, all images go
    first and the markers are dropped, so an image is never silently lost.
    """
    pieces = example.question.split(IMAGE_MARKER)
    content: list[dict] = []
    if len(pieces) - 1 == len(example.images):
        for index, text in enumerate(pieces):
            if text.strip():
                content.append({"type": "text", "text": text.strip()})
            if index < len(example.images):
                content.append({"type": "image"})
    else:
        content += [{"type": "image"} for _ in example.images]
        text = " ".join(piece.strip() for piece in pieces if piece.strip())
        if text:
            content.append({"type": "text", "text": text})
    if instruction:
        content.append({"type": "text", "text": "\n" + instruction})
    return [{"role": "user", "content": content}]


def sft_target(example: Example, target_column: str | None, answer_template: str) -> str:
    """The assistant text to learn: a column of the source (e.g. teacher solutions) or the templated answer."""
    if target_column:
        value = example.extra.get(target_column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty or missing SFT target column {target_column!r}")
        return value
    return answer_template.replace("{answer}", example.answer)
