"""Memory across layers and across tasks: the rehearsal buffer (athena.memory.rehearsal). Modules here change or feed
a model and know nothing of Hydra or of the training loop."""
