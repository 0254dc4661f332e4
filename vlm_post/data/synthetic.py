"""A synthetic visual task in Geometry3K's column layout, rendered with PIL.

The demo has to prove, on a CPU in minutes, that every algorithm learns. The
task is a two-way visual comparison ("which bar is longer, the red one or the
blue one?"): a ~1M-parameter model learns it from pixels in a few hundred SFT
steps, while a random model scores 0 because it never writes ``\\boxed{}``.
Rows carry exactly the columns of ``hiyouga/geometry3k`` (``images``,
``problem``, ``answer``, ``id``, ``choices``, ``ground_truth``), so the real
adapter, prompt, collation and grading code run on them.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220)}
BAR_QUESTION = "<image>Which bar is longer, the red one or the blue one?"


def render_bars(rng: random.Random, size: int = 112) -> tuple[bytes, str]:
    """Draw a red and a blue horizontal bar of different lengths; return (PNG bytes, longer colour)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    lengths = rng.sample(range(size // 6, size - 12), 2)
    while abs(lengths[0] - lengths[1]) < size // 8:  # keep the difference visible at 14-px patches
        lengths = rng.sample(range(size // 6, size - 12), 2)
    colors = ["red", "blue"]
    rng.shuffle(colors)  # which colour sits on top is random, so position is no shortcut
    bar_h = size // 6
    for row, (color, length) in enumerate(zip(colors, lengths)):
        top = size // 5 + row * (size // 2)
        draw.rectangle([6, top, 6 + length, top + bar_h], fill=COLORS[color])
    longer = colors[0] if lengths[0] > lengths[1] else colors[1]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), longer


def make_rows(count: int, seed: int, id_offset: int = 0) -> list[dict]:
    """``count`` deterministic rows in the Geometry3K hub layout."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        png, longer = render_bars(rng)
        choices = ["red", "blue"]
        rows.append(
            {
                "images": [{"bytes": png, "path": None}],
                "problem": BAR_QUESTION,
                "answer": longer,
                "id": id_offset + index,
                "choices": choices,
                "ground_truth": "AB"[choices.index(longer)],
            }
        )
    return rows


def write_demo_dataset(
    out_dir: str | Path, train: int = 2000, validation: int = 200, test: int = 200, seed: int = 0
) -> Path:
    """Write ``{train,validation,test}.parquet`` under ``out_dir`` (ids never overlap across splits)."""
    import datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "id": datasets.Value("int64"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "ground_truth": datasets.Value("string"),
        }
    )
    offset = 0
    for split_index, (split, count) in enumerate(
        [("train", train), ("validation", validation), ("test", test)]
    ):
        rows = make_rows(count, seed=seed * 1000 + split_index, id_offset=offset)
        offset += count
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
    return out_dir


def vocabulary_sentences() -> list[str]:
    """Sentences that cover the task's words, for training the tiny tokenizer."""
    return [BAR_QUESTION.replace("<image>", ""), "red", "blue", "The red bar is longer.", "The blue bar is longer."]
