"""Models Athena trains: the Tiny Recursive Model (athena.models.trm) and Hugging Face causal LMs (athena.models.hf);
build.py turns a run config into a model.

Names are imported on first use (PEP 562): see athena.models.trm.
"""

import importlib

_EXPORTS = {name: "athena.models.trm" for name in ("TinyRecursiveModel", "TRMConfig", "SupervisionCarry",
                                                   "SupervisionOutput")}
_EXPORTS.update({"causal_lm": "athena.models.hf", "smollm2_dir": "athena.models.hf",
                 "HFCausalLMConfig": "athena.models.hf_config"})
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
