"""The two exception types the CLI reports as one line instead of a traceback.

Anything the user can fix before a run (a config value, a path, a data row) raises
``ConfigError`` with a message that names the culprit: exit status 2. A run that
cannot go on (its loss or weights turned non-finite, a save that would write NaN)
raises ``RunStopped``: exit status 1, with what was kept and how to go on.
"""

import re
from pathlib import Path


class ConfigError(ValueError):
    """Bad configuration or input data, with a message meant for the user."""


class RunStopped(RuntimeError):
    """A run stopped on purpose mid-way, with a message meant for the user (what happened, what was kept)."""


DEMO_ARTIFACTS = "artifacts/"  # where tools/demo.py builds the demo's tiny models and data sets


def build_hint(path: object) -> str:
    """For a missing path that a command of this repository writes, that command (else nothing).

    The demo's artifacts (``make artifacts``); a stage's run folder or export, by the config in ``configs/`` whose
    ``trainer.default_root_dir`` holds it; a study's, by the study config whose ``study_dir`` holds it.
    """
    name = str(path).removeprefix("./")
    if name.startswith(DEMO_ARTIFACTS):
        return " (the demo's tiny models and data sets: build them with 'make artifacts')"
    writer = _command_that_writes(Path(name))
    return f" (written by '{writer}': run it first)" if writer else ""


def _command_that_writes(path: Path) -> str | None:
    """The ``vlm_post`` command of a config under ./configs whose output folder holds ``path``, if one does."""
    import yaml

    if path.is_absolute() or not Path("configs").is_dir():
        return None
    for config in sorted(Path("configs").rglob("*.yaml")):
        try:
            values = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(values, dict):
            continue
        study_dir = values.get("study_dir")
        root = (
            (values.get("trainer") or {}).get("default_root_dir") if isinstance(values.get("trainer"), dict) else None
        )
        for folder, command in ((study_dir, "vlm_post study"), (root, "vlm_post fit")):
            if isinstance(folder, str) and path.is_relative_to(folder):
                return f"{command} --config {config}" + (
                    " (make demo runs it)" if config.match("study/demo.yaml") else ""
                )
    return None


# Lines of jsonargparse's nested Union report that say nothing about the culprit.
_UNION_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|- Expected a <class 'NoneType'>)"
)
# A Union branch that was not even tried (the value is a dict, the branch a str): a reason only if none other is.
_UNTRIED_BRANCH = re.compile(r"- Expected a <class '[\w.]+'>")


def one_line_parse_error(message: str) -> str:
    """jsonargparse's error as one line: the full key of the innermost culprit and its reason.

    A bad value under ``model`` comes back as a tree (the subclass, then each nested config, each a Union with
    None); the reason is at its bottom: ``model.init_args.optim.lr: Expected a float. Got value: abc``.
    """
    keys: list[str] = []
    untried = None
    lines = [raw.strip() for raw in message.strip().splitlines()]
    for index, line in enumerate(lines):
        if not line or _UNION_NOISE.match(line):
            continue
        key = re.fullmatch(r'Parser key "(.+)":', line)
        if key:
            keys.append(key[1])
        elif line.startswith("Problem with given class_path"):  # a list of dataclasses: the item's keys follow
            continue
        elif line.startswith("- Problem with given class_path"):
            # A subclass (model, or the reward inside it: class_path + init_args) takes init_args; an optional
            # dataclass does not.
            if keys and keys[-1] != "init_args" and not _names_a_dataclass(line):
                keys.append("init_args")
        elif _UNTRIED_BRANCH.fullmatch(line):
            untried = untried or (list(keys), line)
        else:
            return _culprit(keys, _with_given_value(line, lines[index + 1 :]))
    return _culprit(*untried) if untried else " ".join(message.split())


def _with_given_value(reason: str, rest: list[str]) -> str:
    """Under a Union (``PositiveInt | None``) jsonargparse leaves the value out of the reason; put it back."""
    given = next((line.removeprefix("Given value: ") for line in rest if line.startswith("Given value: ")), None)
    if given is None or ": does not conform" not in reason:  # the value, when there, sits before "does not"
        return reason
    return reason.replace(": does not conform", f": {given} does not conform", 1)


def _culprit(keys: list[str], line: str) -> str:
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", line.removeprefix("- "))
    import_failed = re.search(r"No module named|has no attribute|import|subclass", reason, re.IGNORECASE)
    if keys[-1:] == ["init_args"] and import_failed:
        keys = [*keys[:-1], "class_path"]  # the class itself is the culprit, not its arguments
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def _names_a_dataclass(line: str) -> bool:
    """Whether ``- Problem with given class_path 'pkg.Name':`` names a dataclass (its keys sit under it directly)."""
    import dataclasses

    from jsonargparse.typing import import_object

    found = re.search(r"class_path '([\w.]+)'", line)
    try:
        return bool(found) and dataclasses.is_dataclass(import_object(found[1]))
    except (ImportError, AttributeError, ValueError):
        return False
