"""The one base class for problems a user can fix (bad config, missing data, unusable checkpoint,
diverged training). Entry points print its one-line message and exit; anything else is a bug and
keeps its traceback."""


class AthenaError(Exception):
    """A user-facing problem; the message says what is wrong and how to fix it, in one line."""


class ConfigError(AthenaError, ValueError):
    """A run configuration that cannot work; the message says which key and how to fix it."""
