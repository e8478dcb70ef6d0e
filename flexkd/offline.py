"""The environment defaults every entry point sets before Hugging Face libraries load."""

from __future__ import annotations

import os

# A hub lookup on a machine without the hub hangs ~46 s before failing, so offline is the
# default; users with the hub set HF_HUB_OFFLINE=0 (an explicit value always wins).
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",  # no fork warnings from tokenizers in data loaders
}


def set_offline_defaults() -> None:
    """Set each of `OFFLINE_DEFAULTS` that the environment does not already set."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
