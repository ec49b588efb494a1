"""Models Athena trains: the Tiny Recursive Model (athena.models.trm); build.py turns a run config into a model.

Names are imported on first use (PEP 562): see athena.models.trm.
"""

import importlib

_EXPORTS = {name: "athena.models.trm" for name in ("TinyRecursiveModel", "TRMConfig", "SupervisionCarry",
                                                   "SupervisionOutput")}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
