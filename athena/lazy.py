"""Package names loaded on first use (PEP 562), so that importing a package (athena.config reads schemas from
several) imports no torch until a name that needs it is used.

    __getattr__, __dir__ = lazy_exports(__name__, {"AdapterConfig": ".config", "add_adapters": ".inject"})

A module path starting with "." is relative to the package. A name, once loaded, lands in the package's globals,
so later lookups skip __getattr__.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, loading each name of `exports` (name -> module) when first asked for."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
