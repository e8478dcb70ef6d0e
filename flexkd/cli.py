"""Command-line glue: offline defaults and one-line errors for user mistakes."""

from __future__ import annotations

import logging
import os
import sys

# Offline hygiene: a hub lookup on a machine without the hub hangs ~46 s before failing.
# Users with the hub can set these to 0.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("flexkd")


def guarded(cfg, fn):
    """Call fn(); a UserError becomes one clear line and exit status 2 (debug=true re-raises)."""
    from flexkd.errors import UserError

    try:
        return fn()
    except UserError as e:
        if cfg.get("debug"):
            raise
        print(f"flexkd: error: {e}", file=sys.stderr, flush=True)
        print("flexkd: (run with debug=true for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv=None) -> None:
    """`flexkd assets ...`: the packaged-asset command (more subcommands come with later stages)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("assets",):
        print("usage: flexkd assets [NAME ...] [--cache-dir DIR] [--list] [--verify]\n"
              "       python run.py [overrides]   (training and evaluation runs)", file=sys.stderr)
        sys.exit(2)
    from flexkd.assets import main as assets_main

    assets_main(argv[1:])
