"""A broken HF export, driven through the CLI as a user meets it: one line naming the file, never a traceback.

- ``vlm_post test --model.init_args.init_from <export>`` (or the export as ``model_name_or_path``) on an export
  whose weights are missing, truncated, garbled or have bytes flipped, or whose manifest is missing or edited:
  exit 2, one line naming the file, before any weights load, the broken files left as they were.
- A folder without a vlm_post manifest (a hub model, an export from before manifests): the same for a missing,
  truncated or garbled safetensors file (flipped bytes inside a tensor cannot be seen there).
- ``fit`` whose final weights hold a NaN: exit 1, one line, and the previous export intact.
- A process SIGKILLed at every step of an export leaves the export path the old export or the new one, both
  verified by sha256, and the next fit's cleanup leaves nothing else beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from safetensors import safe_open

from tests.conftest import ROOT
from tests.faults.common import run_cli
from vlm_post.checkpoint_io import remove_leftovers
from vlm_post.cli import main
from vlm_post.models.export import MANIFEST, PROVENANCE, export_hf, verify_hf_folder
from vlm_post.models.loading import load_policy, load_processor

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good_run(tiny_model, tmp_path_factory) -> Path:
    """A run folder holding an export of the tiny model, as ``fit`` leaves it (``export -> export.1``)."""
    run = tmp_path_factory.mktemp("good") / "run"
    model, processor = load_policy(str(tiny_model)), load_processor(str(tiny_model))
    export_hf(model, processor, run / "export", provenance={"weights": "test"})
    return run


@pytest.fixture
def export(good_run, tmp_path) -> Path:
    """A fresh copy of the good run folder (its symlink kept as a symlink); its ``export`` path, to break."""
    shutil.copytree(good_run, tmp_path / "run", symlinks=True)
    return tmp_path / "run" / "export"


def _as_old_export(export: Path) -> None:
    """What an export written before manifests looks like: no manifest, a provenance that names none."""
    (export / MANIFEST).unlink()
    (export / PROVENANCE).write_text(json.dumps({"weights": "test"}))


# --- ways to break an export ---------------------------------------------------------------------


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garble_header(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(8)
        file.write(b"\x00garbled\xff" * 4)


def _flip_4kb(path: Path) -> None:
    """4 KB of flipped bits inside the tensor data: the header, the size and the shape all stay valid."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = bytes(b ^ 0xFF for b in data[start : start + 4096])
    path.write_bytes(bytes(data))


def _edit_manifest(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["files"][WEIGHTS]["sha256"] = "0" * 64  # someone "fixing" a hash by hand
    path.write_text(json.dumps(manifest))


def _garble_json(path: Path) -> None:
    path.write_text(path.read_text()[:40])


BROKEN_EXPORTS = {
    "weights missing": (WEIGHTS, _delete),
    "weights truncated": (WEIGHTS, _truncate),
    "weights header garbled": (WEIGHTS, _garble_header),
    "weights 4 KB flipped": (WEIGHTS, _flip_4kb),
    "config missing": ("config.json", _delete),
    "manifest missing": (MANIFEST, _delete),
    "manifest edited": (MANIFEST, _edit_manifest),
    "manifest garbled": (MANIFEST, _garble_json),
}
BROKEN_OLD_EXPORTS = {  # no manifest: what the headers and sizes alone can tell
    "weights missing": _delete,
    "weights truncated": _truncate,
    "weights header garbled": _garble_header,
}


# --- the CLI -------------------------------------------------------------------------------------


def _eval_args(tiny_model, demo_data, tmp_path, *extra) -> list[str]:
    return [
        "test", "--config", "configs/demo/eval.yaml",
        f"--model.init_args.model_name_or_path={tiny_model}",
        f"--data.test=[{{name: demo_test, path: {demo_data / 'test.parquet'}}}]",
        f"--model.init_args.eval.output_dir={tmp_path / 'eval'}",
        "--model.init_args.eval.n=0",
        f"--trainer.default_root_dir={tmp_path / 'eval_run'}",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def loads(monkeypatch) -> list:
    """The weights loads that happen (none may, before a broken export is refused)."""
    from vlm_post.modules import base

    seen = []
    real = base.load_policy
    monkeypatch.setattr(base, "load_policy", lambda *a, **k: seen.append(a) or real(*a, **k))
    return seen


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.fast
@pytest.mark.parametrize("case", list(BROKEN_EXPORTS))
def test_a_broken_export_is_one_line_naming_the_file(case, export, tiny_model, demo_data, tmp_path, capsys, loads):
    name, breaks = BROKEN_EXPORTS[case]
    breaks(export / name)
    before = _snapshot(export)
    args = _eval_args(tiny_model, demo_data, tmp_path, f"--model.init_args.init_from={export}")
    err = run_cli(args, capsys, 2)
    assert f"{export / name} " in err and "model.init_from" in err, err
    assert not loads, "weights were loaded before the broken export was refused"
    assert _snapshot(export) == before, "the broken export was changed: nothing may be repaired or deleted silently"
    assert not (tmp_path / "eval" / "summary.json").exists()


@pytest.mark.fast
@pytest.mark.parametrize("case", list(BROKEN_OLD_EXPORTS))
def test_a_broken_folder_without_manifest_is_one_line_too(case, export, tiny_model, demo_data, tmp_path, capsys, loads):
    _as_old_export(export)
    BROKEN_OLD_EXPORTS[case](export / WEIGHTS)
    args = _eval_args(tiny_model, demo_data, tmp_path, f"--model.init_args.init_from={export}")
    err = run_cli(args, capsys, 2)
    assert f"{export / WEIGHTS} " in err, err
    assert not loads


@pytest.mark.slow
def test_a_broken_export_as_the_model_itself_is_one_line(export, tiny_model, demo_data, tmp_path, capsys):
    """``model_name_or_path: <export>`` (testing an export without init_from): checked where its weights load."""
    _flip_4kb(export / WEIGHTS)
    args = _eval_args(tiny_model, demo_data, tmp_path, f"--model.init_args.model_name_or_path={export}")
    err = run_cli(args, capsys, 2)
    assert f"{export / WEIGHTS} is not the file the export wrote" in err, err


@pytest.mark.slow
def test_a_whole_export_still_tests(export, tiny_model, demo_data, tmp_path, capsys, loads):
    main(_eval_args(tiny_model, demo_data, tmp_path, f"--model.init_args.init_from={export}"))
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["results"][0]["dataset"] == "demo_test"
    assert len(loads) == 1


class PoisonWeights(Callback):
    """At the end of fit, before the export: one weight turns NaN (as a last update gone wrong would leave it)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            pl_module.policy.lm_head.weight[0, 0] = float("nan")


@pytest.mark.slow
def test_nonfinite_weights_are_not_exported(export, tiny_model, demo_data, tmp_path, capsys):
    run = export.parent
    config = yaml.safe_load((ROOT / "configs/demo/sft.yaml").read_text())
    config["trainer"].update(default_root_dir=str(run), max_steps=1, enable_checkpointing=False, log_every_n_steps=1)
    config["trainer"]["callbacks"] = [{"class_path": "tests.faults.test_export.PoisonWeights"}]
    config["model"]["init_args"]["model_name_or_path"] = str(tiny_model)
    config["data"].update(train={"name": "demo_train", "path": str(demo_data / "train.parquet")}, val=[], batch_size=2)
    config["export"] = {"weights": "last"}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    before = _snapshot(export)
    err = run_cli(["fit", "--config", str(tmp_path / "sft.yaml")], capsys, 1)
    assert "refusing to export: 1 of " in err and "(first: lm_head.weight)" in err, err
    assert f"the export already in {export} is as it was" in err
    assert _snapshot(export) == before and verify_hf_folder(export) == "sha256"
    assert sorted(p.name for p in run.iterdir()) == ["export", "export.1", "lightning_logs"]


# --- SIGKILL inside export_hf ----------------------------------------------------------------------

# Every file-system step of an export; a kill lands just before the n-th one taken.
_STEPS = (
    "os.fsync", "os.rename", "os.replace", "os.symlink", "shutil.rmtree",
    "transformers.modeling_utils.safe_save_file", "vlm_post.models.export._exchange",
)  # fmt: skip
START_STATES = ("versioned", "before versions", "before versions, no renameat2", "none")


def export_killed_at_each_step(tiny_model: str, root: str) -> None:
    """Run in a subprocess: for each start state and each n, fork a child that re-exports new weights and is
    SIGKILLed at its n-th step, until a child gets through. ``root/<state>/<n>/export`` is what each left."""
    model, processor = load_policy(tiny_model), load_processor(tiny_model)
    old = Path(root) / "old"
    export_hf(model, processor, old / "export")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # the new export's weights: told apart from the old by lm_head
    for state in START_STATES:
        for n in range(200):
            run = Path(root) / state / str(n)
            _start_state(old, run, state)
            pid = os.fork()
            if pid == 0:
                if state.endswith("no renameat2"):  # as on macOS: the swap falls back to two renames
                    import ctypes

                    ctypes.CDLL = lambda *args, **kwargs: object()  # a libc without renameat2 (this child only)
                _kill_at_step(n)
                export_hf(model, processor, run / "export")
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if os.WIFEXITED(status):
                break
            assert os.WTERMSIG(status) == signal.SIGKILL


def _start_state(old: Path, run: Path, state: str) -> None:
    if state == "versioned":
        shutil.copytree(old, run, symlinks=True)
    elif state.startswith("before versions"):  # a real folder at the export path, as exports were written until now
        shutil.copytree(old / "export", run / "export")
    else:
        run.mkdir(parents=True)


def _kill_at_step(n: int) -> None:
    """Patch every file-system step an export takes to count, and SIGKILL the process at the n-th."""
    import importlib

    count = iter(range(n + 1))

    def counted(real, what: str):
        def step(*args, **kwargs):
            if next(count, None) == n:
                if what.endswith("safe_save_file"):  # a kill in the middle of writing the weights
                    Path(args[1]).write_bytes(b"half a safetensors file")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return step

    for what in _STEPS:
        module, name = what.rsplit(".", 1)
        owner = importlib.import_module(module)
        setattr(owner, name, counted(getattr(owner, name), what))


@pytest.mark.fast
def test_a_kill_at_any_step_of_an_export_leaves_the_old_or_the_new_export(tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    driver = "import sys; from tests.faults.test_export import export_killed_at_each_step as run; run(*sys.argv[1:])"
    command = [sys.executable, "-c", driver, str(tiny_model), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    old_head = _lm_head(tmp_path / "old" / "export")
    for state in START_STATES:
        runs = sorted((tmp_path / state).iterdir(), key=lambda p: int(p.name))
        assert len(runs) > 8, f"{state}: the export took only {len(runs) - 1} steps to kill at"
        seen = set()
        for run in runs:
            export = run / "export"
            remove_leftovers(run / "checkpoints", export)  # what the next fit does first
            if state == "none" and not export.exists():
                seen.add("old")  # the old state: no export at all
                assert not list(run.iterdir()), f"{run}: leftovers after the cleanup"
                continue
            assert verify_hf_folder(export) == "sha256", run
            head = _lm_head(export)
            seen.add("old" if torch.equal(head, old_head) else "new")
            assert torch.equal(head, old_head) or torch.equal(head, old_head + 1.0), run
            beside = sorted(p.name for p in run.iterdir())
            assert beside in (["export"], ["export", "export.1"], ["export", "export.2"]), (run, beside)
        assert seen == {"old", "new"}, (state, seen)
        assert (runs[-1] / "export").is_symlink()  # the run that got through ends in the versioned layout
        assert torch.equal(load_policy(str(runs[-1] / "export")).lm_head.weight, old_head + 1.0)


def _lm_head(export: Path) -> torch.Tensor:
    with safe_open(export / WEIGHTS, "pt") as weights:
        return weights.get_tensor("lm_head.weight")
