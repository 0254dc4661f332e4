"""The GPU check's data (bench/gpu_step.py): the synthetic demo prompts, with a long target for exact-length SFT rows.

vlm_post.data.synthetic.write_demo_dataset, plus a long ``solution`` column used as the SFT target
(``data.target_column``), so that every SFT row is exactly ``--seq-len`` tokens once the target is cut at
``max_target_tokens`` = seq-len - prompt length; images are resized by the data module (min_pixels = max_pixels
= image-size^2).
"""

from __future__ import annotations

from pathlib import Path


def long_solution(rng, sentences: int) -> str:
    """A long, varied reasoning-like text (the synthetic task's answers are a few tokens)."""
    colors = ["red", "blue"]
    parts = ["<think>"]
    for step in range(sentences):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = colors[rng.randint(0, 1)]
        parts.append(
            f"Step {step + 1}: the {c} bar starts at x = {rng.randint(0, 9)} and ends near x = {a}, while the other "
            f"one ends near x = {b}; the difference is {abs(a - b)} pixels, about {abs(a - b) / 112:.3f} of the width."
        )
    parts.append("</think> \\boxed{red}")
    return " ".join(parts)


def write_data(args, data_dir: Path, rows: int) -> Path:
    """write_demo_dataset, plus a ``solution`` column long enough for ``--seq-len``-token SFT rows."""
    import random

    import datasets

    from vlm_post.data.synthetic import write_demo_dataset

    write_demo_dataset(data_dir, train=rows, validation=1, test=1, seed=args.seed)
    rng = random.Random(args.seed)
    table = datasets.Dataset.from_parquet(str(data_dir / "train.parquet"), cache_dir=str(data_dir / "cache"))
    sentences = max(8, args.seq_len // 16)  # ~35 tokens per sentence: ~2x the longest target needed
    table = table.add_column("solution", [long_solution(rng, sentences) for _ in range(len(table))])
    path = data_dir / "train_long.parquet"
    table.to_parquet(str(path))
    return path


def datamodule(args, path: Path, batch_size: int, max_target_tokens: int | None = None):
    from vlm_post.data import DataSource, VLMDataModule

    pixels = args.image_size * args.image_size
    return VLMDataModule(
        train=DataSource(name="bench_train", kind="geometry3k", path=str(path)),
        batch_size=batch_size,
        num_workers=0,
        target_column="solution",
        max_target_tokens=max_target_tokens,
        min_pixels=pixels,
        max_pixels=pixels,
        seed=args.seed,
    )


def prompt_length(args, model_dir: Path, path: Path) -> tuple[int, int]:
    """Tokens of one prompt (chat template + image tokens) and of its long target, through vlm_post's collator."""
    from transformers import AutoProcessor

    dm = datamodule(args, path, 1)
    dm.processor = AutoProcessor.from_pretrained(str(model_dir))
    example = dm._dataset(dm.train_source)[0]
    batch = dm.collator(True, True)([example])
    return int(batch["prompt"]["attention_mask"].sum()), int(batch["sft"]["attention_mask"].sum())
