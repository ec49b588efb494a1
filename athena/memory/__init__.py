"""Memory added to a model: AMRPA (cross-layer attention memory, athena.memory.amrpa)."""
