"""A kill (here: an exception) in the middle of a checkpoint write leaves the previous checkpoint intact."""

from __future__ import annotations

import pytest
import torch

from vlm_post.checkpoint_io import AtomicCheckpointIO


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_halfway(obj, file, *args, **kwargs):
        file.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3


def test_the_cli_uses_atomic_checkpoints(tiny_model, demo_data, tmp_path, monkeypatch):
    import sys

    from tests.conftest import ROOT
    from vlm_post.cli import VLMPostCLI

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["vlm_post"])
    cli = VLMPostCLI(
        args=[
            "--config", "configs/demo/sft.yaml",
            f"--model.init_args.model_name_or_path={tiny_model}",
            f"--data.train.path={demo_data / 'train.parquet'}",
            f"--data.val=[{{name: demo_val, path: {demo_data / 'validation.parquet'}}}]",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
