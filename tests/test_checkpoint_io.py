"""A kill (here: an exception) in the middle of a checkpoint write leaves the previous checkpoint intact."""

from __future__ import annotations

import pytest
import torch

from vlm_post.checkpoint_io import AtomicCheckpointIO, remove_leftovers

pytestmark = pytest.mark.fast


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


def _demo_cli(tiny_model, demo_data, root, monkeypatch):
    """The CLI on the demo's SFT config, built (run=False) as ``vlm_post fit`` builds it, in run folder ``root``."""
    import sys

    from tests.conftest import ROOT
    from vlm_post.cli import VLMPostCLI

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["vlm_post"])
    return VLMPostCLI(
        args=[
            "--config", "configs/demo/sft.yaml",
            f"--model.init_args.model_name_or_path={tiny_model}",
            f"--data.train.path={demo_data / 'train.parquet'}",
            f"--data.val=[{{name: demo_val, path: {demo_data / 'validation.parquet'}}}]",
            f"--trainer.default_root_dir={root}",
        ],
        run=False,
    )  # fmt: skip


def test_the_cli_uses_atomic_checkpoints(tiny_model, demo_data, tmp_path, monkeypatch):
    cli = _demo_cli(tiny_model, demo_data, tmp_path, monkeypatch)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


def test_leftovers_of_an_interrupted_save_are_removed_at_the_next_start(
    tiny_model, demo_data, tmp_path, monkeypatch, capsys
):
    """A kill inside a save leaves AtomicCheckpointIO's temporary file (or export_hf's folder): the next fit removes it."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"the previous checkpoint")
    orphan = checkpoints / ".last.ckpt.k3j2.tmp"
    orphan.write_bytes(b"half a checkpoint")
    half_export = tmp_path / ".export.x8q1"
    half_export.mkdir()
    (half_export / "config.json").write_text("{}")
    keep = tmp_path / "notes.tmp"  # not a name our writers use
    keep.write_text("mine")
    _demo_cli(tiny_model, demo_data, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert not orphan.exists() and not half_export.exists()
    assert (checkpoints / "last.ckpt").read_bytes() == b"the previous checkpoint" and keep.read_text() == "mine"
    assert f"removed {orphan}, left by a save that was interrupted" in err and f"removed {half_export}" in err


def test_leftovers_of_an_interrupted_export_never_include_the_live_version(tmp_path):
    """Beside ``export -> export.2``: a temporary folder and link, and the version a killed export replaced, go;
    the live version, folders of the user's and anything a symlink points to stay."""
    from vlm_post.models.export import MANIFEST

    def version(name: str, manifest: bool = True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        if manifest:
            (tmp_path / name / MANIFEST).write_text("{}")
        return tmp_path / name

    stale, live, pinned = version("export.1"), version("export.2"), version("export.4")
    users_own = version("export.3", manifest=False)
    (tmp_path / "export").symlink_to("export.2")
    (tmp_path / "best").symlink_to("export.4")  # the user's own link to an older version
    half = version(".export.k3j2")
    link = tmp_path / ".export.9f8e.link"
    link.symlink_to("export.2")  # a kill between making the new link and swapping it in
    found = remove_leftovers(tmp_path / "checkpoints", tmp_path / "export")
    assert sorted(p.name for p in found) == sorted([stale.name, half.name, link.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "export", "export.2", "export.3", "export.4"]
    assert live.is_dir() and users_own.is_dir() and pinned.is_dir() and (tmp_path / "export" / MANIFEST).is_file()


def test_an_export_path_a_kill_left_missing_is_pointed_at_the_complete_version(tmp_path):
    """Killed between the two renames of a swap without renameat2: no ``export``, the old folder parked, the new
    version complete beside it. The next fit points ``export`` at the new version and removes the old."""
    from vlm_post.models.export import MANIFEST

    (tmp_path / "export.1").mkdir()
    (tmp_path / "export.1" / MANIFEST).write_text("{}")
    parked = tmp_path / ".export.1a2b.old"
    parked.mkdir()
    found = remove_leftovers(tmp_path / "checkpoints", tmp_path / "export")
    assert found == [parked] and not parked.exists()
    assert (tmp_path / "export").readlink().name == "export.1"
