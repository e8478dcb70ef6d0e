"""Resolve model/data sources: `fixture:<name>` (shipped with the package),
`asset:<name>` (materialised from PyPI wheels), or a hub name / local path, unchanged."""

from __future__ import annotations

from pathlib import Path


def resolve_source(source: str, cache_dir: str | Path | None = None) -> str:
    if source.startswith("fixture:"):
        from flexkd.fixtures import fixture_path

        return str(fixture_path(source.split(":", 1)[1]))
    if source.startswith("asset:"):
        from flexkd.assets import resolve_source as resolve_asset

        return resolve_asset(source, cache_dir)
    return source
