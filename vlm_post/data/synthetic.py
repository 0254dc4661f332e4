"""Synthetic visual tasks for the CPU demo, rendered with PIL.

The demo has to show, on a CPU in minutes, that every algorithm learns, and
that a warm start still leaves RL something to learn. The in-domain task is a
two-way visual comparison ("which bar is longer, the red one or the blue
one?") in Geometry3K's column layout (``images``, ``problem``, ``answer``,
``id``, ``choices``, ``ground_truth``), so the real adapter, prompt, collation
and grading code run on it. Bar-length differences are drawn log-uniformly
from 1 px to about half the image, so many pairs differ by less than a 14-px
patch: a ~1M-parameter model learns the easy pairs from pixels in a few
hundred SFT steps and keeps improving slowly on the hard ones, while a random
model scores 0 because it never writes ``\\boxed{}``.

The out-of-domain set (``make_ood_rows``) is a related but different question
in MathVista's column layout (``pid``, ``question``, ``image``,
``decoded_image``, ``choices``, ``answer``, ``question_type``, ...), graded by
the MathVista scorer: the same two colours drawn as vertical columns, "which
column is taller?", as a multiple choice.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220)}
BAR_QUESTION = "<image>Which bar is longer, the red one or the blue one?"
COLUMN_QUESTION = "Which column is taller, the red one or the blue one?"
HARD_FRACTION = 0.6  # the share of pairs whose lengths differ by less than an eighth of the image
JITTER = 24  # px: each horizontal bar starts up to this far right of the margin, so its end is no shortcut


def _lengths(rng: random.Random, size: int, hard_fraction: float, jitter: int) -> tuple[int, int]:
    """Two bar lengths in [size // 6, size - 12 - jitter]. With probability ``hard_fraction`` they differ by
    1 px up to an eighth of the image (log-uniform: mostly less than a 14-px patch), else by more."""
    low, high = size // 6, size - 12 - jitter
    split = size // 8
    if rng.random() < hard_fraction:
        diff = int(math.exp(rng.uniform(0.0, math.log(split))))
    else:
        diff = rng.randint(split, high - low)
    short = rng.randint(low, high - diff)
    return short, short + diff


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_bars(
    rng: random.Random,
    size: int = 112,
    vertical: bool = False,
    hard_fraction: float = HARD_FRACTION,
    jitter: int = JITTER,
) -> tuple[bytes, str]:
    """Draw a red and a blue bar of different lengths (horizontal, or vertical columns standing on a
    common base line); return (PNG bytes, the colour of the longer one)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    lengths = list(_lengths(rng, size, hard_fraction, 0 if vertical else jitter))
    rng.shuffle(lengths)
    colors = ["red", "blue"]
    rng.shuffle(colors)  # which colour sits first is random, so position is no shortcut
    thickness = size // 6
    for slot, (color, length) in enumerate(zip(colors, lengths)):
        offset = size // 5 + slot * (size // 2)
        if vertical:  # columns rise from the bottom edge
            draw.rectangle([offset, size - 6 - length, offset + thickness, size - 6], fill=COLORS[color])
        else:
            start = 6 + rng.randint(0, jitter)
            draw.rectangle([start, offset, start + length, offset + thickness], fill=COLORS[color])
    longer = colors[0] if lengths[0] > lengths[1] else colors[1]
    return _png(image), longer


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


def make_ood_rows(count: int, seed: int, pid_offset: int = 0) -> list[dict]:
    """``count`` deterministic rows in the ``AI4Math/MathVista`` layout: vertical red/blue columns,
    "which column is taller?", multiple choice (the choices' order is random)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        png, taller = render_bars(rng, vertical=True)
        choices = ["red", "blue"]
        rng.shuffle(choices)
        pid = str(pid_offset + index + 1)
        rows.append(
            {
                "pid": pid,
                "question": COLUMN_QUESTION,
                "image": f"images/{pid}.png",
                "decoded_image": {"bytes": png, "path": None},
                "choices": choices,
                "unit": None,
                "precision": None,
                "answer": taller,
                "question_type": "multi_choice",
                "answer_type": "text",
                "metadata": {
                    "split": "testmini",
                    "language": "english",
                    "img_width": 112,
                    "img_height": 112,
                    "source": "vlm_post synthetic",
                    "category": "general-vqa",
                    "task": "figure question answering",
                    "context": "synthetic scene",
                    "grade": "elementary school",
                    "skills": ["numeric commonsense"],
                },
            }
        )
    return rows


def write_demo_dataset(
    out_dir: str | Path, train: int = 2000, validation: int = 200, test: int = 200, seed: int = 0, ood_test: int = 200
) -> Path:
    """Write ``{train,validation,test}.parquet`` (Geometry3K layout; ids never overlap across splits) and
    ``ood_test.parquet`` (MathVista layout, ``ood_test`` rows; none when 0) under ``out_dir``."""
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
    for split_index, (split, count) in enumerate([("train", train), ("validation", validation), ("test", test)]):
        rows = make_rows(count, seed=seed * 1000 + split_index, id_offset=offset)
        offset += count
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
    if ood_test:
        write_ood_dataset(out_dir / "ood_test.parquet", ood_test, seed=seed * 1000 + 3)
    return out_dir


def write_ood_dataset(path: str | Path, count: int = 200, seed: int = 3) -> Path:
    """Write ``make_ood_rows`` to one parquet file, in the hub's MathVista schema (read with ``kind: mathvista``)."""
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "pid": text,
            "question": text,
            "image": text,
            "decoded_image": datasets.Image(),
            "choices": datasets.Sequence(text),
            "unit": text,
            "precision": datasets.Value("float64"),
            "answer": text,
            "question_type": text,
            "answer_type": text,
            "metadata": {
                "split": text,
                "language": text,
                "img_width": datasets.Value("int64"),
                "img_height": datasets.Value("int64"),
                "source": text,
                "category": text,
                "task": text,
                "context": text,
                "grade": text,
                "skills": datasets.Sequence(text),
            },
        }
    )
    datasets.Dataset.from_list(make_ood_rows(count, seed), features=features).to_parquet(str(path))
    return path


def vocabulary_sentences() -> list[str]:
    """Sentences that cover the task's words, for training the tiny tokenizer."""
    return [BAR_QUESTION.replace("<image>", ""), "red", "blue", "The red bar is longer.", "The blue bar is longer."]
