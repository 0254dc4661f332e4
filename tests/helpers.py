"""Small builders the tests share (not fixtures, so tests can vary them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch

from vlm_post.data import DataSource, VLMDataModule
from vlm_post.modules import EvalConfig, OptimConfig, SFTModule
from vlm_post.rollout import ModelRows


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter of ``model``, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def unmoved(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """The trainable parameters of ``model`` still equal to ``before`` (``trainable_weights`` taken earlier)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[name])]


def unshared_prompts(rows: ModelRows) -> ModelRows:
    """``rows`` stated as if no two rows shared a prompt: the forward then runs every row's prompt itself."""
    return dataclasses.replace(rows, leaders=list(range(rows.num_rows)), group=torch.arange(rows.num_rows))


def sft_module(model_dir: Path, **kwargs) -> SFTModule:
    kwargs.setdefault("optim", OptimConfig(lr=1e-3, warmup_steps=2, schedule="constant"))
    kwargs.setdefault("eval", EvalConfig(n=0, greedy=True, max_new_tokens=12))
    return SFTModule(str(model_dir), **kwargs)


def demo_datamodule(data_dir: Path, batch_size: int = 8, **kwargs) -> VLMDataModule:
    return VLMDataModule(
        train=DataSource("demo_train", path=str(data_dir / "train.parquet")),
        val=[DataSource("demo_val", path=str(data_dir / "validation.parquet"))],
        test=[DataSource("demo_test", path=str(data_dir / "test.parquet"))],
        batch_size=batch_size,
        eval_batch_size=16,
        min_pixels=12544,
        max_pixels=12544,
        **kwargs,
    )


def trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("log_every_n_steps", 1)  # the tests read every step's metrics
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def examples_with_0_1_2_images() -> list:
    """Three problems with no image, one and two images (ids text, one, two): image offsets differ per prompt."""
    from PIL import Image

    from vlm_post.data.schema import Example

    return [
        Example(id="text", images=[], question="Find x if 2x = 6.", answer="3", source="s"),
        Example(
            id="one",
            images=[Image.new("RGB", (112, 112), "red")],
            question="<image>Which bar?",
            answer="red",
            source="s",
        ),
        Example(
            id="two",
            images=[Image.new("RGB", (56, 56), "blue"), Image.new("RGB", (84, 56), "white")],
            question="<image> and <image>: which is longer, the red one or the blue one?",
            answer="blue",
            source="s",
        ),
    ]
