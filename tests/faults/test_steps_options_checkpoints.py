"""Faults and bad input, driven through the CLI as a user meets them (issue #13): this package is the one place.

Every case asserts the exit status, that the message is one line with no traceback, and that nothing good was
lost: earlier checkpoints, exports and caches are byte for byte as they were. Here: non-finite steps, the range
of every numeric option, and a broken ``--ckpt_path``; beside it: data rows (test_data), exports (test_export),
the teacher cache (test_teacher).
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import types
import typing
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

from tests.faults.common import digests, run_cli
from vlm_post.cli import main
from vlm_post.data.datamodule import VLMDataModule
from vlm_post.modules import DistillModule, RLModule, SFTModule
from vlm_post.ranges import RANGE_TYPES

SFT, RL, OPD = "configs/demo/sft.yaml", "configs/demo/rl.yaml", "configs/demo/opd.yaml"


def run_args(tiny_model: Path, demo_data: Path, root: Path, **options: object) -> list[str]:
    """The demo config's paths pointed at the test's tiny model, data and run folder; short validation."""
    overrides = {
        "model.init_args.model_name_or_path": tiny_model,
        "data.train.path": demo_data / "train.parquet",
        "data.val": f"[{{name: demo_val, path: {demo_data / 'validation.parquet'}, limit: 8}}]",
        "trainer.default_root_dir": root,
        **options,
    }
    return [f"--{key}={value}" for key, value in overrides.items()]


# --- 1. Non-finite steps ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_model, demo_data, tmp_path_factory) -> Path:
    """A short good SFT run: checkpoints (best and last) and an export, for the runs below to endanger."""
    root = tmp_path_factory.mktemp("sft_run")
    args = run_args(tiny_model, demo_data, root, **{"trainer.max_steps": 4, "trainer.val_check_interval": 2})
    try:
        main(["fit", "--config", SFT, *args])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "export").is_dir()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("config", [SFT, RL])
def test_an_exploding_learning_rate_stops_the_run_and_keeps_what_was_saved(
    config, sft_run, tiny_model, demo_data, capsys
):
    """lr 1e6: the first update blows the weights up, every later step is NaN. The run must end (RL looped
    forever: skipped steps never advanced global_step), say why in one line, exit 1, and leave the earlier
    checkpoints and export untouched (SFT wrote NaN weights into both)."""
    before = digests(sft_run / "checkpoints") | {f"export/{k}": v for k, v in digests(sft_run / "export").items()}
    args = run_args(
        tiny_model,
        demo_data,
        sft_run,
        **{
            "model.init_args.init_from": sft_run / "checkpoints" / "last.ckpt",
            "model.init_args.optim.lr": 1e6,
            "model.init_args.optim.warmup_steps": 0,
            "trainer.max_steps": 50,
            "trainer.val_check_interval": 25,
        },
    )
    line = run_cli(["fit", "--config", config, *args], capsys, status=1)
    assert "3 optimizer step(s) in a row had a non-finite loss or gradient" in line, line
    assert f"the checkpoints already in {sft_run / 'checkpoints'}" in line and "are as they were" in line, line
    after = digests(sft_run / "checkpoints") | {f"export/{k}": v for k, v in digests(sft_run / "export").items()}
    assert after == before
    state = torch.load(sft_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


@pytest.mark.slow
def test_one_skip_allowed_is_stop_at_the_first(sft_run, tiny_model, demo_data, capsys):
    args = run_args(
        tiny_model,
        demo_data,
        sft_run / "strict",
        **{
            "model.init_args.init_from": sft_run / "checkpoints" / "last.ckpt",
            "model.init_args.optim.lr": 1e6,
            "model.init_args.max_consecutive_skips": 1,
            "trainer.max_steps": 50,
        },
    )
    line = run_cli(["fit", "--config", SFT, *args], capsys, status=1)
    assert "stopped at step 2: 1 optimizer step(s) in a row" in line and "no checkpoint had been written yet" in line


# --- A broken --ckpt_path ------------------------------------------------------------------------------


def flip_bytes(path: Path, count: int = 4096) -> None:
    """Invert ``count`` bytes in the middle of ``path``: what a bad disk or a bad copy does."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        chunk = handle.read(count)
        handle.seek(path.stat().st_size // 2)
        handle.write(bytes(byte ^ 0xFF for byte in chunk))


@pytest.mark.fast
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "no such checkpoint"),
        ("truncated", "not a whole checkpoint"),
        ("flipped", "damaged: its record archive/data/"),
        ("folder", "a folder, but not a sharded checkpoint"),
    ],
)
def test_a_broken_ckpt_path_is_one_line(damage, expected, sft_run, tiny_model, demo_data, tmp_path, capsys):
    broken = tmp_path / "broken.ckpt"
    original = (sft_run / "checkpoints" / "last.ckpt").read_bytes()
    if damage == "truncated":
        broken.write_bytes(original[: len(original) // 2])
    elif damage == "flipped":
        broken.write_bytes(original)
        flip_bytes(broken)
    elif damage == "folder":
        broken.mkdir()
    args = run_args(tiny_model, demo_data, tmp_path / "run", **{"trainer.max_steps": 8})
    line = run_cli(["fit", "--config", SFT, *args, f"--ckpt_path={broken}"], capsys, status=2)
    assert f"--ckpt_path {broken}: {expected}" in line, line


@pytest.mark.fast
def test_checkpoints_keep_parsed_numbers_as_plain_int_and_float(sft_run):
    """Parsed values are range-typed (PositiveInt(3)); pickled so, a checkpoint needs vlm_post.ranges to load."""
    checkpoint = torch.load(sft_run / "checkpoints" / "last.ckpt", weights_only=True)
    ranged = []

    def walk(value, where):
        if isinstance(value, RANGE_TYPES):
            ranged.append(where)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        elif dataclasses.is_dataclass(value):
            walk(dataclasses.asdict(value), where)

    walk({key: value for key, value in checkpoint.items() if key != "state_dict"}, "checkpoint")
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] > 0 and not ranged, ranged


# --- 2. Every numeric option carries its range, checked when the config is parsed ----------------------


def init_parameters(cls: type) -> dict[str, object]:
    """A class's constructor arguments and their types, following ``**kwargs`` up the MRO as jsonargparse does."""
    found: dict[str, object] = {}
    for klass in cls.__mro__:
        if klass in (LightningModule, object) or "__init__" not in vars(klass):
            continue
        hints = typing.get_type_hints(klass.__init__)
        parameters = inspect.signature(klass.__init__).parameters.values()
        for parameter in parameters:
            if parameter.name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                found.setdefault(parameter.name, hints.get(parameter.name))
        if not any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters):
            break
    return found


def numeric_options(hint: object, key: str, wrap: str = "{}"):
    """(key, type, how a value is written) for every number under ``hint``: in unions, lists, tuples, dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            yield from numeric_options(arm, key, wrap)
    elif origin is list and not dataclasses.is_dataclass(args[0]):  # lists of data sources: covered by data.train
        yield from numeric_options(args[0], key, "[{}]")
    elif origin is tuple:
        yield from numeric_options(args[0], key, "[" + ", ".join(["{}"] * len(args)) + "]")
    elif dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        for field in dataclasses.fields(hint):
            yield from numeric_options(hints[field.name], f"{key}.{field.name}", wrap)
    elif isinstance(hint, type) and issubclass(hint, (int, float)) and hint is not bool:
        yield key, hint, wrap


def out_of_range_values(kind: type) -> list[object]:
    """One value breaking each of a range type's restrictions (``v > 0`` gives 0, ``v <= 1`` gives 1.5, ...)."""
    step = 1 if issubclass(kind, int) else 0.5
    beyond = {operator.gt: 0, operator.ge: -step, operator.lt: 0, operator.le: step}
    return [reference + beyond[op] for op, reference in kind._restrictions]


def all_numeric_options() -> list[tuple[str, str, type, str]]:
    """(config, key, type, wrap) for every numeric option of every module, the data module and the reward."""
    sources = [
        (SFT, "model.init_args", SFTModule),
        (RL, "model.init_args", RLModule),
        (OPD, "model.init_args", DistillModule),
        (SFT, "data", VLMDataModule),
    ]
    from vlm_post.rewards import MathReward

    sources.append((RL, "model.init_args.reward.init_args", MathReward))  # the reward configs/demo/rl.yaml names
    # Each class is walked on its own: an option two modules share is tried in each, since each could declare it
    # with its own type (DistillModule's untyped copies of RL's options once hid behind RL's typed ones).
    return [
        (config, key, kind, wrap)
        for config, prefix, cls in sources
        for name, hint in init_parameters(cls).items()
        for key, kind, wrap in numeric_options(hint, f"{prefix}.{name}")
    ]


NUMERIC_OPTIONS = all_numeric_options()


@pytest.mark.fast
def test_every_numeric_option_has_a_range_type():
    unbounded = [key for _, key, kind, _ in NUMERIC_OPTIONS if kind not in RANGE_TYPES]
    assert not unbounded, f"type these with a range from vlm_post.ranges: {unbounded}"
    assert len(NUMERIC_OPTIONS) > 40  # the walk found the options (it would pass vacuously otherwise)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("config", "key", "kind", "wrap"),
    [option for option in NUMERIC_OPTIONS if option[2] in RANGE_TYPES],
    ids=[f"{Path(option[0]).stem}:{option[1]}" for option in NUMERIC_OPTIONS if option[2] in RANGE_TYPES],
)
def test_an_out_of_range_value_is_one_line_naming_the_key_and_the_range(config, key, kind, wrap, capsys):
    for value in out_of_range_values(kind):
        line = run_cli(["fit", "--config", config, f"--{key}={wrap.format(*[value] * wrap.count('{}'))}"], capsys, 2)
        assert f"{key}: Not of type {kind.__name__}: {value} does not conform to restriction" in line, line


def study_numeric_options() -> list[tuple[str, type, str]]:
    from vlm_post.study.config import StudyConfig

    return [(key.lstrip("."), kind, wrap) for key, kind, wrap in numeric_options(StudyConfig, "")]


STUDY_OPTIONS = study_numeric_options()


@pytest.mark.fast
def test_every_numeric_study_option_has_a_range_type():
    assert STUDY_OPTIONS and all(kind in RANGE_TYPES for _, kind, _ in STUDY_OPTIONS), STUDY_OPTIONS


@pytest.mark.fast
@pytest.mark.parametrize(("key", "kind", "wrap"), STUDY_OPTIONS, ids=[option[0] for option in STUDY_OPTIONS])
def test_an_out_of_range_study_value_is_one_line_naming_the_key(key, kind, wrap, capsys):
    study = "configs/study/demo.yaml"
    for value in out_of_range_values(kind):
        argument = f"--{key}={wrap.format(*[value] * wrap.count('{}'))}"
        line = run_cli(["study", "--config", study, "--dry-run", argument], capsys, 2)
        assert f"{study}: {key}: Not of type {kind.__name__}: {value} does not conform to restriction" in line, line


# --- 7. An output folder on a read-only mount (root ignores chmod, not a read-only file system) -----------


@pytest.fixture
def read_only_mount(tmp_path):
    import subprocess

    mount = tmp_path / "read_only"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root in a container that allows it): {made.stderr!r}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.fast
@pytest.mark.parametrize("key", ["trainer.default_root_dir", "export.dirpath", "model.init_args.eval.output_dir"])
def test_an_output_folder_on_a_read_only_mount_is_one_line(
    key, read_only_mount, tiny_model, demo_data, tmp_path, capsys
):
    args = run_args(tiny_model, demo_data, tmp_path / "run", **{key: read_only_mount / "out"})
    line = run_cli(["fit", "--config", SFT, *args], capsys, status=2)
    assert f"{key}: {read_only_mount / 'out'} cannot be written: {read_only_mount} is not writable" in line, line


@pytest.mark.fast
def test_rl_with_one_sample_per_prompt_is_one_line(tiny_model, demo_data, tmp_path, capsys):
    """n = 1 is in PositiveInt's range, but GRPO has no group to compare with: refused before any weights load."""
    args = run_args(tiny_model, demo_data, tmp_path, **{"model.init_args.init_from": tiny_model})
    line = run_cli(["fit", "--config", RL, *args, "--model.init_args.rollout.n=1"], capsys, status=2)
    assert "model.init_args.rollout.n: 1 sample per prompt has no group to compare with" in line, line
