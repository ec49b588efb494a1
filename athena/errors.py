"""The one base class for problems a user can fix (bad config, missing data, unusable checkpoint,
diverged training). Entry points print its one-line message and exit; anything else is a bug and
keeps its traceback."""

from __future__ import annotations

import functools
from typing import Callable

from pydantic import ValidationError


class AthenaError(Exception):
    """A user-facing problem; the message says what is wrong and how to fix it, in one line."""


class ConfigError(AthenaError, ValueError):
    """A run configuration that cannot work; the message says which key and how to fix it."""


def one_line_construction(to_error: Callable[[ValidationError], Exception]):
    """Class decorator for a pydantic dataclass: construction raises to_error(the validation error), one line naming
    the first problem, instead of pydantic's multi-line ValidationError (what plain-Python users and the trainer
    catch)."""

    def decorate(cls):
        validating_init = cls.__init__

        @functools.wraps(validating_init)
        def __init__(self, *args, **kwargs):
            try:
                validating_init(self, *args, **kwargs)
            except ValidationError as error:
                raise to_error(error) from None

        cls.__init__ = __init__
        return cls

    return decorate
