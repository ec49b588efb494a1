"""The base of every config schema in Athena: strict pydantic models, `_target_` nodes, and one-line errors.

Each component owns its schema next to its code (athena/models/trm/config.py, athena/adapters/config.py,
athena/training/config.py); athena/config.py composes them into the schema of a whole run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class TargetNode(Strict):
    """A node Hydra instantiates: `_target_` (a dotted path) and `_partial_`."""

    target: str = Field(alias="_target_")
    partial: bool = Field(default=False, alias="_partial_")


def describe(error: ValidationError, prefix: str = "") -> str:
    """'<dotted key>: <what is wrong> (got <value>) [and N more problems]' for the first problem of a validation."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in (*([prefix] if prefix else []), *first["loc"])) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (remove it, or check its spelling against conf/)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    tail = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{where}: {message}{tail}"
