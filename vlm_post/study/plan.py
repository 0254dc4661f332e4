"""The study's plan: every stage it runs, as one ``Stage`` object each, in an order that respects dependencies.

A stage is an ordinary ``vlm_post fit`` or ``vlm_post test`` command in a run folder of its own; ``Stage`` knows
its command, what it waits for, where its export lands, whether it finished and how to resume it. The plan is
saved as ``<study_dir>/study.json``, which is all that ``vlm_post study report`` reads besides the run folders.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from vlm_post.errors import ConfigError
from vlm_post.fs import atomic_path
from vlm_post.study.config import PLACEHOLDER, EvalProtocol, EvalSet, SlurmResources, StageSpec, StudyConfig

MARKER = "vlm_post_stage.json"  # written when a stage exited 0 (and, for fit, left its export)
STEP_CHECKPOINTS = "checkpoints/steps"  # the last stage's every-K-steps checkpoints, for the step_<K> points


@dataclass
class Stage:
    """One node of the plan.

    ``key`` is the run folder below the study folder (``sft_early/seed0/rl``, ``shared/teacher``,
    ``base/eval``); ``needs`` are the keys of the stages it waits for. Evaluation stages carry ``arm``, ``seed``,
    ``point`` (``entry``, ``end``, ``step_<K>``) and ``step``; training stages carry ``arm`` and ``seed`` only.
    """

    key: str
    command: str  # fit | test
    run_dir: str
    arguments: list[str]
    needs: list[str] = field(default_factory=list)
    arm: str | None = None
    seed: int | None = None
    point: str | None = None
    step: int | None = None
    curves: bool = False  # the arm's last stage: its logged entropy and accuracy are the RL curves
    slurm: SlurmResources = field(default_factory=SlurmResources)
    workdir: str = "."  # where the command runs; ``run_dir`` and the paths in ``arguments`` are relative to it

    @property
    def run_path(self) -> Path:
        """The run folder, for this process to read and write (``run_dir`` resolved against ``workdir``)."""
        return Path(self.workdir) / self.run_dir

    @property
    def export_dir(self) -> Path:
        return self.run_path / "export"

    @property
    def marker(self) -> Path:
        return self.run_path / MARKER

    @property
    def log(self) -> Path:
        return self.run_path / "stage.log"

    @property
    def eval_dir(self) -> Path:
        return self.run_path / "eval"

    def resume_checkpoint(self) -> Path | None:
        """An interrupted fit's ``last.ckpt``, which ``--ckpt_path`` resumes exactly (tests rerun from the start)."""
        last = self.run_path / "checkpoints" / "last.ckpt"
        return last if self.command == "fit" and last.exists() else None

    def argv(self) -> list[str]:
        """``vlm_post`` arguments of the next attempt: resume from ``last.ckpt`` when an earlier one left it."""
        resume = self.resume_checkpoint()
        return [self.command, *self.arguments, *([f"--ckpt_path={resume}"] if resume else [])]

    def shell(self) -> str:
        """The exact command, as a user would type it (without the resume argument)."""
        return shlex.join(["vlm_post", self.command, *self.arguments])

    def finished(self) -> bool:
        """Whether it ran to the end with this very command; the marker of another command is refused."""
        if not self.marker.is_file():
            return False
        recorded = json.loads(self.marker.read_text()).get("command")
        if recorded != self.shell():
            raise ConfigError(
                f"stage {self.key}: {self.run_dir} holds a finished run of another command (see {self.marker}); "
                "restore the study config, or remove the folder to run the stage anew"
            )
        return True

    @property
    def expected_output(self) -> Path:
        """What a successful exit leaves: the HF export a fit hands on, or the evaluation's summary."""
        return self.export_dir / "config.json" if self.command == "fit" else self.eval_dir / "summary.json"

    def output_problem(self) -> str | None:
        """What a successful exit should have left and did not."""
        if self.expected_output.is_file():
            return None
        if self.command == "fit":
            return f"it wrote no HF export in {self.export_dir} (export.enabled: false?), which the next stage needs"
        return f"it wrote no {self.expected_output}"

    def mark_finished(self) -> None:
        record = {"key": self.key, "command": self.shell(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with atomic_path(self.marker) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")


@dataclass
class Plan:
    """The stages in dependency order, and what the report needs to know of the study."""

    study_dir: str
    stages: list[Stage]
    arms: list[str]
    seeds: list[int]
    evaluation: EvalProtocol
    workdir: str = "."  # the study's working directory: every relative path of the study config is relative to it

    @property
    def study_path(self) -> Path:
        return Path(self.workdir) / self.study_dir

    def by_key(self) -> dict[str, Stage]:
        return {stage.key: stage for stage in self.stages}

    def dependents(self, key: str) -> set[str]:
        """Every stage that waits, directly or not, for ``key``."""
        out: set[str] = set()
        for stage in self.stages:  # dependency order: a stage's needs come before it
            if key in stage.needs or out & set(stage.needs):
                out.add(stage.key)
        return out

    def save(self) -> Path:
        path = self.study_path / "study.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @staticmethod
    def load(study_dir: str | Path) -> Plan:
        path = Path(study_dir) / "study.json"
        if not path.is_file():
            raise ConfigError(f"{study_dir} holds no study.json: not a study folder (run 'vlm_post study' first)")
        raw = json.loads(path.read_text())
        stages = [Stage(**{**s, "slurm": SlurmResources(**s["slurm"])}) for s in raw["stages"]]
        protocol = raw["evaluation"]
        datasets = [EvalSet(**item) for item in protocol["datasets"]]
        protocol = EvalProtocol(**{**protocol, "datasets": datasets, "slurm": SlurmResources(**protocol["slurm"])})
        return Plan(raw["study_dir"], stages, raw["arms"], raw["seeds"], protocol, raw.get("workdir", "."))


def build_plan(study: StudyConfig, base_dir: Path | None = None) -> Plan:
    """Every stage of the study: shared stages once, each arm's chain per seed, then its evaluations.

    ``base_dir`` (default: the current directory) is the study's working directory: the relative paths of the
    study config (its stage configs, the evaluation config, ``study_dir``) are relative to it, and every stage
    runs in it, so the relative paths inside the stage configs are too. The commands keep the paths as written.
    """
    workdir = str(Path(base_dir or Path.cwd()).resolve())
    root = Path(study.study_dir)
    stages: list[Stage] = []
    shared: dict[tuple[str, int | None], Stage] = {}  # (name, seed, or None when run once for all seeds)

    def shared_for(seed: int | None) -> dict[str, Stage]:
        """The shared stages a stage of this seed may name (None: a shared stage that runs once for all seeds)."""
        return {name: stage for (name, stage_seed), stage in shared.items() if stage_seed in (None, seed)}

    for spec in study.shared:
        for seed in study.seeds if spec.seeded else [None]:
            key = f"shared/seed{seed}/{spec.name}" if spec.seeded else f"shared/{spec.name}"
            seed_value = study.seeds[0] if seed is None else seed
            stage = _fit_stage(key, spec, root / key, seed_value, None, shared_for(seed), study, previous=None)
            stages.append(stage)
            shared[(spec.name, seed)] = stage
    stages.append(_eval_stage("base/eval", None, None, "entry", None, root / "base" / "eval", [], study, None))
    for arm in study.arms:
        for seed in study.seeds:
            named = shared_for(seed)  # grows by the arm's own stages, which later stages may name
            chain: list[Stage] = []
            for index, spec in enumerate(arm.stages):
                key = f"{arm.name}/seed{seed}/{spec.name}"
                last = index == len(arm.stages) - 1
                previous = chain[-1] if chain else None
                chain.append(_fit_stage(key, spec, root / key, seed, arm.name, named, study, previous, last=last))
                named[spec.name] = chain[-1]
            stages.extend(chain)
            stages.extend(_arm_evaluations(arm.name, seed, chain, arm.stages[-1], root, study, workdir))
    for stage in stages:
        stage.workdir = workdir
    return Plan(str(root), stages, [arm.name for arm in study.arms], list(study.seeds), study.evaluation, workdir)


def _export_argument(stage: Stage) -> str:
    """A stage's export folder as the commands name it: relative to the working directory, like its run folder."""
    return str(Path(stage.run_dir) / "export")


def _fit_stage(
    key: str,
    spec: StageSpec,
    run_dir: Path,
    seed: int,
    arm: str | None,
    named: dict[str, Stage],
    study: StudyConfig,
    previous: Stage | None,
    last: bool = False,
) -> Stage:
    """A ``vlm_post fit``: its config, run folder and seed, ``init_from`` the previous stage's export, overrides."""
    arguments = [
        "--config",
        spec.config,
        f"--trainer.default_root_dir={run_dir}",
        f"--export.dirpath={run_dir / 'export'}",
    ]
    arguments += [f"--seed_everything={seed}", f"--data.seed={seed}"]
    if previous:
        arguments.append(f"--model.init_args.init_from={_export_argument(previous)}")
    every = study.evaluation.every_k_steps
    if last and every:  # keep a checkpoint every K steps for the step_<K> evaluation points
        arguments += [
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={run_dir / STEP_CHECKPOINTS}",
            f"--trainer.callbacks.every_n_train_steps={every}",
            "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename=step{step:06d}",
            "--trainer.callbacks.auto_insert_metric_name=false",
        ]
    for name in sorted(spec.references() - set(named)):  # check() saw the name: it is a seeded shared stage
        raise ConfigError(
            f"shared: {spec.name} runs once for all seeds but names ${{{name}}}, which runs once per seed"
        )
    values = {"run_dir": str(run_dir), "seed": str(seed), "study_dir": study.study_dir}
    values.update({name: _export_argument(stage) for name, stage in named.items()})
    arguments += [PLACEHOLDER.sub(lambda match: values[match[1]], item) for item in spec.arguments()]
    needs = ([previous.key] if previous else []) + [named[name].key for name in sorted(spec.references())]
    resources = spec.slurm.over(study.launcher.slurm)
    return Stage(
        key, "fit", str(run_dir), arguments, list(dict.fromkeys(needs)), arm, seed, curves=last, slurm=resources
    )


def _arm_evaluations(
    arm: str, seed: int, chain: list[Stage], rl: StageSpec, root: Path, study: StudyConfig, workdir: str
) -> list[Stage]:
    """RL entry (the warm start's export), every K RL steps (its checkpoints), RL end (its export)."""
    entry, end = chain[-2], chain[-1]
    folder = root / arm / f"seed{seed}"
    stages = [_eval_stage(f"{arm}/seed{seed}/eval_entry", arm, seed, "entry", 0, folder / "eval_entry", [entry], study,
                          _export_argument(entry))]  # fmt: skip
    every = study.evaluation.every_k_steps
    for step in range(every, _max_steps(rl, workdir), every) if every else []:
        checkpoint = Path(end.run_dir) / STEP_CHECKPOINTS / f"step{step:06d}.ckpt"
        stages.append(_eval_stage(f"{arm}/seed{seed}/eval_step_{step}", arm, seed, f"step_{step}", step,
                                  folder / f"eval_step_{step}", [end], study, str(checkpoint)))  # fmt: skip
    stages.append(_eval_stage(f"{arm}/seed{seed}/eval_end", arm, seed, "end", None, folder / "eval_end", [end], study,
                              _export_argument(end)))  # fmt: skip
    return stages


def _max_steps(spec: StageSpec, workdir: str) -> int:
    """``trainer.max_steps`` of a stage: its last override, or its config's."""
    for item in reversed(spec.arguments()):
        if item.startswith("--trainer.max_steps="):
            return int(item.split("=", 1)[1])
    config = yaml.safe_load((Path(workdir) / spec.config).read_text()) or {}
    steps = (config.get("trainer") or {}).get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            f"evaluation.every_k_steps: the RL stage {spec.name} ({spec.config}) sets no trainer.max_steps, "
            "so the study cannot tell which step checkpoints there will be; set it in the stage's overrides"
        )
    return steps


def _eval_stage(
    key: str,
    arm: str | None,
    seed: int | None,
    point: str,
    step: int | None,
    run_dir: Path,
    after: list[Stage],
    study: StudyConfig,
    init_from: str | None,
) -> Stage:
    """A ``vlm_post test`` of ``init_from`` (the base model when None) under the study's evaluation protocol."""
    protocol = study.evaluation
    sources = json.dumps([item.source() for item in protocol.datasets], separators=(",", ":"))
    arguments = ["--config", protocol.config, f"--trainer.default_root_dir={run_dir}"]
    if init_from:
        arguments.append(f"--model.init_args.init_from={init_from}")
    arguments += [f"--data.test={sources}", f"--model.init_args.eval.output_dir={run_dir / 'eval'}"]
    eval_args = dict(n=protocol.n, temperature=protocol.temperature, max_new_tokens=protocol.max_new_tokens,
                     bootstrap_resamples=protocol.bootstrap_resamples, confidence=protocol.confidence,
                     seed=protocol.bootstrap_seed)  # fmt: skip
    arguments += [f"--model.init_args.eval.{name}={value}" for name, value in eval_args.items() if value is not None]
    if protocol.pass_k:
        arguments.append(f"--model.init_args.eval.pass_k={json.dumps(protocol.pass_k)}")
    arguments += [item if item.startswith("--") else f"--{item}" for item in protocol.overrides]
    resources = protocol.slurm.over(study.launcher.slurm)
    return Stage(key, "test", str(run_dir), arguments, [s.key for s in after], arm, seed, point, step, slurm=resources)
