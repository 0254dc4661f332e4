"""The ``vlm_post`` command: Lightning's CLI with our module, data and export defaults.

    vlm_post fit      --config configs/demo/sft.yaml
    vlm_post validate --config configs/demo/sft.yaml --model.init_from runs/demo/sft/export
    vlm_post test     --config configs/demo/eval.yaml --model.init_from runs/demo/sft/export
    vlm_post fit      --config configs/demo/sft.yaml --ckpt_path runs/demo/sft/checkpoints/last.ckpt
    vlm_post study    --config configs/study/demo.yaml          (vlm_post.study: arms of fit/test stages)

The config picks the stage by ``model.class_path`` (``vlm_post.modules.SFTModule``, ...).
Every config error (unknown key, wrong type, missing file, unresolvable model,
missing data) ends in one line naming the culprit and exit status 2, before any
weights are loaded.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vlm_post.callbacks import HFExport
from vlm_post.checkpoint_io import remove_leftovers
from vlm_post.data.datamodule import VLMDataModule
from vlm_post.errors import ConfigError, RunStopped, one_line_parse_error
from vlm_post.modules.base import PolicyModule

EXIT_RUN_STOPPED = 1
EXIT_CONFIG_ERROR = 2


def _fail(message: str, status: int = EXIT_CONFIG_ERROR) -> None:
    sys.stderr.write(f"vlm_post: error: {message}\n")
    sys.exit(status)


STUDY_HELP = (
    "Runs a whole warm-start study (arms of fit and test stages, seeds, local or SLURM) and its report; "
    "see 'vlm_post study --help'."
)

# Options that changed name: a config with the old one is refused in one line that names the new one.
RENAMED_OPTIONS = {"ppo_epochs": "epochs"}


def _name_the_new_option(line: str) -> str:
    refused = re.fullmatch(r"(\S+): Option '(\w+)' is not accepted", line)
    if refused is None or refused[2] not in RENAMED_OPTIONS:
        return line
    where, old = refused[1], refused[2]
    return f"{where}.{old}: renamed, use {where}.{RENAMED_OPTIONS[old]} (the same setting)"


class _Parser(LightningArgumentParser):
    """jsonargparse's parser, but errors are one short message instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        _fail(f"{_name_the_new_option(one_line_parse_error(str(message)))}\n(see '{prog} --help')")


class VLMPostCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", PolicyModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", VLMDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _Parser)
        # Checkpoints are written atomically unless the config names its own plugins.
        kwargs.setdefault(
            "trainer_defaults", {"plugins": [{"class_path": "vlm_post.checkpoint_io.AtomicCheckpointIO"}]}
        )
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # main() runs `vlm_post study` before this parser sees it; it is listed here so that --help shows it.
        # jsonargparse's parser keeps its subcommands action privately (tests/test_cli.py reads the listing).
        study = self.parser_class(description=STUDY_HELP)
        parser._subcommands_action.add_subcommand("study", study, help=STUDY_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFExport, "export")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads a --ckpt_path's hyperparameters first thing; a missing or broken file is one line.
        if self.config.get("subcommand"):
            _check_ckpt_path(self.config[self.config.subcommand])
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            reason = " ".join(str(error).split())[:200]
            raise ConfigError(
                f"--ckpt_path {ckpt_path}: cannot be read ({reason}); resume from another checkpoint"
            ) from None

    def before_instantiate_classes(self) -> None:
        # Unset trainer.precision: bf16 mixed precision where the device supports it, fp32 elsewhere.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)
        # One run folder: checkpoints default to <default_root_dir>/checkpoints (not a per-version logger
        # folder), so `--trainer.default_root_dir` moves checkpoints, logs and the export together.
        _check_sharded_ckpt_path(config)
        root = config.trainer.default_root_dir or "."
        _check_writable(root, "trainer.default_root_dir")
        if self.subcommand in ("fit", None):  # None: the CLI built with run=False, to fit by hand
            export = getattr(config, "export", None)
            export_dir = Path(export.dirpath if export is not None and export.dirpath else Path(root) / "export")
            for leftover in remove_leftovers(Path(root) / "checkpoints", export_dir):
                sys.stderr.write(f"vlm_post: removed {leftover}, left by a save that was interrupted\n")
        if getattr(config, "export", None) is not None and config.export.dirpath:
            _check_writable(config.export.dirpath, "export.dirpath")
        evaluation = getattr(getattr(config.model, "init_args", None), "eval", None)
        output_dir = (
            evaluation.get("output_dir") if hasattr(evaluation, "get") else getattr(evaluation, "output_dir", None)
        )
        if output_dir:
            _check_writable(output_dir, "model.init_args.eval.output_dir")
        for callback in config.trainer.callbacks or []:
            init_args = getattr(callback, "init_args", None)
            if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and init_args.dirpath is None:
                init_args.dirpath = str(Path(root) / "checkpoints")


def _check_ckpt_path(config) -> None:
    """A ``--ckpt_path`` that exists and is a whole checkpoint, or one line now (not a traceback once weights load)."""
    import zipfile

    from vlm_post.models.init_from import is_sharded_checkpoint

    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning's own names for a checkpoint
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip; a truncated one has no directory
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: not a whole checkpoint ({path.stat().st_size} bytes, no zip directory: "
            "truncated or not a torch checkpoint); resume from another one in its folder"
        )
    if path.is_file():
        # Every record of torch's zip carries a CRC-32: one read of the file finds bytes changed on disk, which
        # torch.load would take as weights.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged:
            raise ConfigError(
                f"--ckpt_path {ckpt_path}: damaged: its record {damaged} fails its CRC check (bytes changed on "
                "disk); resume from another checkpoint in its folder"
            )
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise ConfigError(f"--ckpt_path {ckpt_path}: a folder, but not a sharded checkpoint (no .metadata)")


def _check_sharded_ckpt_path(config) -> None:
    """A sharded checkpoint folder resumes only under the strategy that wrote it; say so instead of a traceback."""
    from vlm_post.models.init_from import is_sharded_checkpoint, sharded_checkpoint_writer

    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or not is_sharded_checkpoint(Path(ckpt_path)):
        return
    strategy = config.trainer.strategy
    name = str(getattr(strategy, "class_path", strategy))
    writer = sharded_checkpoint_writer(Path(ckpt_path))
    reader = "fsdp1" if "FSDPStrategy" in name or name.startswith("fsdp") else None
    reader = "fsdp2" if "ModelParallelStrategy" in name else reader
    if writer != reader:
        wrote = "FSDP1, FSDPStrategy" if writer == "fsdp1" else "FSDP2, ModelParallelStrategy"
        raise ConfigError(
            f"--ckpt_path {ckpt_path} is a sharded checkpoint folder ({wrote}), but trainer.strategy is {name}: "
            f"resume it with the strategy that wrote it, or take its weights only with "
            f"--model.init_args.init_from {ckpt_path}"
        )


def _check_writable(path: str, key: str) -> None:
    """An output folder that can be made and written, or one line now (not a traceback once the model loaded)."""
    wanted = Path(path).expanduser().absolute()
    for folder in (wanted, *wanted.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise ConfigError(f"{key}: {path} cannot be made: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK):  # also a read-only mount, even for root
            raise ConfigError(f"{key}: {path} cannot be written: {folder} is not writable")
        return


def default_precision(accelerator) -> str:
    import torch

    wants_gpu = accelerator in ("auto", "gpu", "cuda") or accelerator is None
    return "bf16-mixed" if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _quiet_progress_bars() -> None:
    # Per-file download/convert bars from datasets and transformers drown the training log.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["study"]:  # the study layer runs the other subcommands, as processes of their own
        from vlm_post.study.cli import main as study_main

        study_main(argv[1:])
    _quiet_progress_bars()
    try:
        VLMPostCLI(args=args)
    except Exception as error:
        # jsonargparse wraps errors raised while instantiating classes; find ours in the chain.
        cause = _user_error_in_chain(error)
        if cause is None:
            raise
        _fail(str(cause), EXIT_RUN_STOPPED if isinstance(cause, RunStopped) else EXIT_CONFIG_ERROR)
    finally:
        distributed = _destroy_process_group()
    if distributed and args is None:  # a launched rank whose run succeeded (never a test calling main)
        _exit_skipping_finalization()


def _destroy_process_group() -> bool:
    """Tear down the process group Lightning started (its strategies never do) while the interpreter is whole;
    whether there was one.

    Left to interpreter exit, gloo's worker threads can outlive the objects they hold and the rank dies of
    SIGABRT ("terminate called without an active exception") after a run that succeeded: pytorch/pytorch#190489.
    Destroying it is local to this rank (no collective).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def _exit_skipping_finalization() -> None:
    """Exit 0 now: the atexit handlers run (the sympy pool's, logging's), streams are flushed, and the interpreter's
    teardown, where C++ objects of torch.distributed are destroyed in no set order, is skipped.

    Destroying the process group was not enough: a rank of a 2-process FSDP2 run still died of SIGABRT
    ("terminate called without an active exception") after its work was done and saved: rarely, twice in CI (a
    torchrun and a SLURM launch, tests/test_launch.py). A rank's outputs are all written by then (checkpoints, export, the
    loggers' files: Lightning finalizes its loggers at the end of fit and test).
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _user_error_in_chain(error: BaseException | None) -> ConfigError | RunStopped | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (ConfigError, RunStopped)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
