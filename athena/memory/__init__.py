"""Memory across layers and across tasks: AMRPA, cross-layer attention memory (athena.memory.amrpa), and the
rehearsal buffer (athena.memory.rehearsal). Modules here change or feed a model and know nothing of Hydra or of the
training loop."""
