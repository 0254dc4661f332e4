"""The one exception type for bad user input.

Anything the user can fix (a config value, a path, a data row) raises ``ConfigError``
with a message that names the culprit. The CLI prints that message alone and exits
with status 2, instead of a traceback.
"""


class ConfigError(ValueError):
    """Bad configuration or input data, with a message meant for the user."""
