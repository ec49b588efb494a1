"""Athena: experiments on small recursive-reasoning models and efficient adaptation."""

import os

# Bitwise-reproducible CPU runs (exact resume): without conditional numerical reproducibility, MKL may pick a
# different code path for a matmul depending on how its buffers happen to be aligned, so two identical runs can
# differ in the last bits. Takes effect only if set before torch loads MKL, i.e. when athena is imported first
# (pretrain.py and evaluate.py do); a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
