"""AMRPA: a memory of earlier layers' attention patterns, gated into the attention of chosen layers of a Hugging Face
transformer (config.py: the knobs; layer.py: the attention math; inject.py: putting it in, metrics, save/load)."""

from athena.memory.amrpa.config import AMRPAConfig, AMRPAConfigError, resolve_layers
from athena.memory.amrpa.inject import (
    amrpa_aux_loss,
    amrpa_parameters,
    amrpa_state_dict,
    get_amrpa_metrics,
    inject_amrpa,
    load_amrpa,
    reset_amrpa_history,
    save_amrpa,
)

__all__ = ["AMRPAConfig", "AMRPAConfigError", "resolve_layers", "inject_amrpa", "get_amrpa_metrics",
           "reset_amrpa_history", "amrpa_aux_loss", "amrpa_parameters", "amrpa_state_dict", "save_amrpa",
           "load_amrpa"]
