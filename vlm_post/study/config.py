"""The study config: arms of chained stages, shared stages, one evaluation protocol, seeds and a launcher.

Parsed by jsonargparse like every vlm_post config, so a wrong type or an unknown key is one line that names the
key; ``check`` adds what types cannot say (names that resolve, files that exist, a plan without cycles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlm_post.errors import ConfigError, one_line_parse_error
from vlm_post.ranges import NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt, check_ranges

# A placeholder in an override: ${run_dir}, ${seed}, ${study_dir}, or ${<stage>}, the export of a shared stage or of
# an earlier stage of the same arm. Not {name}: Lightning's own templates (ModelCheckpoint filenames) use that.
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][\w-]*)\}")
BUILTIN_PLACEHOLDERS = {"run_dir", "seed", "study_dir"}
NAME = re.compile(r"[A-Za-z][\w-]*")


@dataclass
class VLLMServers:
    """vLLM servers a stage's SLURM job starts beside its trainer, for ``model.vllm.server_urls`` (server mode,
    docs/rollout.md): one server on each of ``nodes`` nodes added to the job, started by docs/rollout.md's command;
    the trainer runs on the job's other nodes and is given their addresses.

    Args:
        model: the folder or hub id the servers start from: the stage's ``model_name_or_path`` (architecture,
            tokenizer, image processor; the weights come from the trainer at its first step).
        nodes: server nodes (one server each, over that node's GPUs).
        port: the port each server listens on.
        args: further arguments of every server (``--tensor-parallel-size 8``, ``--max-model-len 10240``).
    """

    model: str
    nodes: PositiveInt = 1
    port: PositiveInt = 8000
    args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class SlurmResources:
    """What one stage asks SLURM for; unset fields take the launcher's defaults.

    Args:
        nodes: nodes of the job.
        gpus_per_node: GPUs per node; also the tasks per node (one process per GPU, as Lightning expects).
        tasks_per_node: tasks per node when the stage uses no GPUs.
        cpus_per_task: CPUs per task.
        time: the job's time limit, in sbatch's syntax (``4:00:00``).
        partition: the partition.
        extra: further ``#SBATCH`` lines, as written (``--account=abc``, ``--qos=high``).
        vllm_servers: vLLM servers started beside the trainer, on nodes of their own (added to ``nodes``).
    """

    nodes: PositiveInt | None = None
    gpus_per_node: NonNegativeInt | None = None
    tasks_per_node: PositiveInt | None = None
    cpus_per_task: PositiveInt | None = None
    time: str | None = None
    partition: str | None = None
    extra: list[str] = field(default_factory=list)
    vllm_servers: VLLMServers | None = None

    def __post_init__(self) -> None:
        check_ranges(self)  # built in Python; a parsed config was checked against the same types

    def over(self, defaults: SlurmResources) -> SlurmResources:
        """These resources, with the unset ones taken from ``defaults`` (``extra`` lines add up)."""
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else getattr(defaults, name)
        names = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "time", "partition")
        names += ("vllm_servers",)
        return SlurmResources(**{name: pick(name) for name in names}, extra=[*defaults.extra, *self.extra])


@dataclass
class StageSpec:
    """One stage: a stage config run by ``vlm_post fit``, plus dotted overrides in the command line's syntax.

    Args:
        name: the stage's name, its run folder under the arm's (``<study_dir>/<arm>/seed<N>/<name>``).
        config: the stage config file (``configs/demo/sft.yaml``).
        overrides: ``--key=value`` (or ``key=value``) arguments appended to the command. They may name
            ``${run_dir}``, ``${seed}``, ``${study_dir}`` and ``${<stage>}``: the export folder of a shared stage
            or of an earlier stage of the same arm (OPD's ``--model.init_args.teacher.model_name_or_path=${teacher}``).
        slurm: this stage's SLURM resources (the ``slurm`` launcher).
    """

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    slurm: SlurmResources = field(default_factory=SlurmResources)

    def arguments(self) -> list[str]:
        """The overrides as command-line arguments (``key=value`` gets its ``--``)."""
        return [item if item.startswith("--") else f"--{item}" for item in self.overrides]

    def references(self) -> set[str]:
        return {name for item in self.overrides for name in PLACEHOLDER.findall(item)} - BUILTIN_PLACEHOLDERS


@dataclass
class SharedStageSpec(StageSpec):
    """A stage several arms use (the teacher's SFT): it runs once, in ``<study_dir>/shared/<name>``.

    Arms name its export as ``${<name>}`` in their overrides; a shared stage may name earlier shared stages.

    Args:
        seeded: run it once per seed (in ``<study_dir>/shared/seed<N>/<name>``) instead of once for the study.
    """

    seeded: bool = False


@dataclass
class Arm:
    """One warm start and its RL: a chain of stages, each initialised from the export of the one before.

    The evaluation points are the export of the next-to-last stage (``entry``: RL entry), the export of the last
    (``end``: RL end), and, with ``evaluation.every_k_steps``, the last stage's checkpoints every K steps.

    Args:
        name: the arm's name (its folder, and ``arm`` in results.json).
        stages: the chain; the first starts from the config's own weights.
    """

    name: str
    stages: list[StageSpec]


@dataclass
class EvalSet:
    """A data set of the evaluation protocol, as ``data.test`` takes it, tagged in-domain or out-of-domain.

    Args:
        name: reported under this name.
        path: hub id or local files.
        kind: the source adapter (``geometry3k``, ``mathvista``).
        split: the split of a hub data set or folder.
        domain: ``in`` (the RL task's own distribution) or ``out``.
        limit: evaluate only the first ``limit`` problems.
    """

    name: str
    path: str
    kind: Literal["geometry3k", "mathvista"] = "geometry3k"
    split: str | None = None
    domain: Literal["in", "out"] = "in"
    limit: PositiveInt | None = None

    def __post_init__(self) -> None:
        check_ranges(self)  # built in Python; a parsed config was checked against the same types

    def source(self) -> dict:
        out = {"name": self.name, "path": self.path, "kind": self.kind}
        out.update({key: value for key, value in (("split", self.split), ("limit", self.limit)) if value is not None})
        return out


@dataclass
class EvalProtocol:
    """One evaluation for every arm and point: the same data sets, samples and intervals.

    Args:
        config: the ``vlm_post test`` config that holds the rest (trainer, model, image sizes).
        datasets: the data sets, each tagged ``in`` or ``out``; the first of each domain heads results.md.
        n: sampled responses per problem.
        temperature: their sampling temperature.
        max_new_tokens: the response budget (unset: the config's).
        pass_k: the k of pass@k (unset: 1, 2, 4, ... below n, and n); the report's pass@k curve takes every k up to n.
        bootstrap_resamples: resamples of problems for every interval, per arm and between arms.
        confidence: the intervals' level.
        bootstrap_seed: the resampling seed.
        every_k_steps: also evaluate the last stage's checkpoints every K steps (the point ``step_<K>``); the
            last stage's config must then set ``trainer.max_steps``.
        overrides: more ``--key=value`` arguments for every evaluation.
        slurm: the evaluations' SLURM resources.
    """

    config: str
    datasets: list[EvalSet]
    n: PositiveInt = 16
    temperature: PositiveFloat = 1.0  # n samples: 0 would draw one greedy answer n times
    max_new_tokens: PositiveInt | None = None
    pass_k: list[PositiveInt] | None = None
    bootstrap_resamples: PositiveInt = 10_000
    confidence: OpenUnitInterval = 0.95
    bootstrap_seed: NonNegativeInt = 0
    every_k_steps: PositiveInt | None = None
    overrides: list[str] = field(default_factory=list)
    slurm: SlurmResources = field(default_factory=SlurmResources)

    def __post_init__(self) -> None:
        check_ranges(self)  # built in Python; a parsed config was checked against the same types

    def domain_of(self, dataset: str) -> str:
        return next(item.domain for item in self.datasets if item.name == dataset)


@dataclass
class LauncherConfig:
    """How stages run.

    Args:
        kind: ``local`` (subprocesses on this machine) or ``slurm`` (one ``sbatch`` job per stage, chained
            with ``--dependency=afterok``).
        max_parallel: ``local``: stages running at once.
        python: the interpreter that runs ``-m vlm_post`` (unset: this one).
        setup: shell lines each SLURM job runs first (``source .venv/bin/activate``, ``module load cuda``).
        slurm: default resources of every SLURM job.
        wait: ``slurm``: wait for the jobs and print how each stage ended, instead of returning once submitted.
        poll_s: ``slurm`` with ``wait``: seconds between looks at the queue.
    """

    kind: Literal["local", "slurm"] = "local"
    max_parallel: PositiveInt = 1
    python: str | None = None
    setup: list[str] = field(default_factory=list)
    slurm: SlurmResources = field(default_factory=SlurmResources)
    wait: bool = False
    poll_s: PositiveFloat = 10.0

    def __post_init__(self) -> None:
        check_ranges(self)  # built in Python; a parsed config was checked against the same types


@dataclass
class StudyConfig:
    """A warm-start study: every arm, every seed, one evaluation protocol.

    Args:
        study_dir: where every stage's run folder, the plan and the report go.
        arms: the arms compared; every pair gets paired differences.
        evaluation: the protocol shared by all arms (the base model is evaluated by it too).
        shared: stages that arms reference as ``${<name>}`` in their overrides; each runs once.
        seeds: every arm is replicated for each seed (``--seed_everything`` and ``--data.seed``).
        launcher: where the stages run.
    """

    study_dir: str
    arms: list[Arm]
    evaluation: EvalProtocol
    shared: list[SharedStageSpec] = field(default_factory=list)
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0])
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def check(self, base_dir: Path) -> None:
        """What the types cannot say: one ``ConfigError`` naming the key."""
        if not self.seeds:
            raise ConfigError("seeds: a study needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: {self.seeds} lists a seed twice")
        if not self.arms:
            raise ConfigError("arms: a study needs at least one arm")
        shared = {stage.name for stage in self.shared}
        _names([stage.name for stage in self.shared], "shared")
        _names([arm.name for arm in self.arms], "arms", reserved={"base", "shared"})
        for index, stage in enumerate(self.shared):
            earlier = {previous.name for previous in self.shared[:index]}
            _stage(stage, f"shared[{index}] ({stage.name})", base_dir, allowed=earlier)
        for a, arm in enumerate(self.arms):
            if len(arm.stages) < 2:
                raise ConfigError(
                    f"arms[{a}] ({arm.name}).stages: an arm is a warm start and its RL, 2 stages at least"
                )
            _names([stage.name for stage in arm.stages], f"arms[{a}] ({arm.name}).stages")
            for s, stage in enumerate(arm.stages):
                earlier = {previous.name for previous in arm.stages[:s]}
                _stage(stage, f"arms[{a}] ({arm.name}).stages[{s}]", base_dir, allowed=shared | earlier)
        protocol = self.evaluation
        _file(protocol.config, "evaluation.config", base_dir)
        if not protocol.datasets:
            raise ConfigError("evaluation.datasets: the protocol needs at least one data set")
        _names([item.name for item in protocol.datasets], "evaluation.datasets")
        for k in protocol.pass_k or []:  # each k >= 1 is its type's; k <= n is not a type
            if k > protocol.n:
                raise ConfigError(f"evaluation.pass_k: {k} is more than n={protocol.n}")


def _names(names: list[str], key: str, reserved: set[str] = frozenset()) -> None:
    for name in names:
        if not NAME.fullmatch(name):
            raise ConfigError(f"{key}: name {name!r} must be letters, digits, '_' or '-', starting with a letter")
        if name in reserved:
            raise ConfigError(f"{key}: the name {name!r} is taken by the study itself")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"{key}: {', '.join(twice)} named twice")


def _file(path: str, key: str, base_dir: Path) -> None:
    if not (base_dir / path).is_file():
        raise ConfigError(f"{key}: no such config file: {path}")


def _stage(stage: StageSpec, key: str, base_dir: Path, allowed: set[str]) -> None:
    _file(stage.config, f"{key}.config", base_dir)
    unknown = sorted(stage.references() - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(
            f"{key}.overrides: ${{{unknown[0]}}} is neither a shared stage nor an earlier stage of the arm "
            f"(known: {known}; built in: {', '.join(sorted(BUILTIN_PLACEHOLDERS))})"
        )
    for item in stage.overrides:
        if not re.fullmatch(r"(--)?[\w.]+[+]?=.*", item, re.DOTALL):
            raise ConfigError(f"{key}.overrides: {item!r} is not of the form --key=value")


def load_study(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None) -> StudyConfig:
    """Parse and check a study config, then ``overrides`` (``--seeds=[1]``, ``--study_dir=...``) over it.

    Every problem is one ``ConfigError`` that names the key.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    if not Path(path).is_file():
        raise ConfigError(f"--config: no such study config: {path}")
    parser = ArgumentParser(prog="vlm_post study", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(StudyConfig, fail_untyped=True, sub_configs=True)
    try:
        study = parser.instantiate_classes(parser.parse_args(["--config", str(path), *overrides]))
    except Exception as error:  # jsonargparse's nested report, as one line
        raise ConfigError(f"{path}: {one_line_parse_error(str(error))}") from None
    study = StudyConfig(**{key: study[key] for key in StudyConfig.__dataclass_fields__})
    study.check(base_dir or Path.cwd())
    return study
