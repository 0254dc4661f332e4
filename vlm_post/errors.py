"""The one exception type for bad user input.

Anything the user can fix (a config value, a path, a data row) raises ``ConfigError``
with a message that names the culprit. The CLI prints that message alone and exits
with status 2, instead of a traceback.
"""


class ConfigError(ValueError):
    """Bad configuration or input data, with a message meant for the user."""


DEMO_ARTIFACTS = "artifacts/"  # where tools/demo.py builds the demo's tiny models and data sets


def build_hint(path: object) -> str:
    """For a missing path in the demo's artifacts folder: the command that builds it (else nothing)."""
    name = str(path).removeprefix("./")
    return " (the demo's tiny models and data sets: build them with 'make artifacts')" if name.startswith(DEMO_ARTIFACTS) else ""
