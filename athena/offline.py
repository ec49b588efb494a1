"""The Hugging Face libraries stay off the network: Athena's models, tokenizers and lm-eval tasks are local files, and
a silent download would make a run depend on a hub that GPU nodes cannot reach (and hang there until a timeout)."""

from __future__ import annotations

import os

HUB_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hf_offline() -> None:
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless the user set them (=0 lets a run reach the hub). The libraries
    read them when first imported, so callers run this before importing transformers, datasets or lm_eval."""
    for name in HUB_VARIABLES:
        os.environ.setdefault(name, "1")
