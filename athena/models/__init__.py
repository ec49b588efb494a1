"""Models Athena trains: the Tiny Recursive Model (athena.models.trm) and Hugging Face causal LMs (athena.models.hf);
build.py turns a run config into a model.

Names are imported on first use (PEP 562): see athena.models.trm.
"""

from athena.lazy import lazy_exports

_EXPORTS = {name: "athena.models.trm" for name in ("TinyRecursiveModel", "TRMConfig", "SupervisionCarry",
                                                   "SupervisionOutput")}
_EXPORTS.update({"causal_lm": "athena.models.hf", "smollm2_dir": "athena.models.hf",
                 "HFCausalLMConfig": "athena.models.hf_config"})
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
