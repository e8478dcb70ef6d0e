"""One helper for every content-addressed cache entry (assets, teacher fine-tunes, probes...).

    value, entry = get_or_build(cache_root, "probe", {"cfg": ..., "teacher": ...},
                                build=lambda out: write_files(out),   # -> info dict or None
                                load=lambda path: read_files(path))

An entry is the folder ``<cache_root>/<kind>/<key>/`` (or ``<kind>/<name>/`` when the caller
gives a stable, human-readable `name`, as assets do), where ``key = entry_key(kind, key_obj,
version)`` is a content hash of the JSON-able `key_obj`. Bump `version` when `build` changes
what it writes: entries built by the older version then no longer match and are rebuilt.

* The folder is filled by `build(tmp)` in a temporary sibling and renamed into place
  (`flexkd.storage.atomic_directory`); the manifest `MANIFEST_NAME` (key, key object, created
  time, build seconds, every file with its size and sha256, and the `info` dict `build`
  returned) is written last, so an interrupted build is never mistaken for a finished one.
* Before loading, the entry is checked (`check_entry`): cheap by default (manifest, key,
  file sizes), with ``full_verify=True`` also every sha256. A missing, damaged, mismatched or
  unloadable (`load` raises) entry is rebuilt with a warning.
* A `filelock.FileLock` per entry (``<kind>/.<name>.lock``) makes concurrent processes (sweep
  jobs, DDP ranks) build an entry once: the others wait, re-check, and load what it built.
* A `build` that raises leaves no new entry behind (its temporary folder is removed).
* `adopt_entry` takes over a finished entry of an older cache layout (writes the manifest
  for files whose sizes and hashes the old layout recorded) instead of rebuilding it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from flexkd.storage import atomic_directory, atomic_write_json, content_hash, file_sha256

log = logging.getLogger(__name__)

MANIFEST_NAME = "flexkd-entry.json"
MANIFEST_FORMAT = 1
NOT_BUILT = "not built"

T = TypeVar("T")


@dataclass(frozen=True)
class EntryInfo:
    """Where an entry lives and how it was obtained (for logs and results.json)."""

    path: Path
    key: str
    cache_hit: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "key": self.key, "cache_hit": self.cache_hit,
                "seconds": round(self.seconds, 3)}


def entry_key(kind: str, key_obj: Any, version: int = 1) -> str:
    """The content key of an entry: a hash of (kind, version, key object)."""
    return content_hash({"kind": kind, "version": version, "key": key_obj})


def entry_path(root: str | Path, kind: str, name: str) -> Path:
    return Path(root).expanduser() / kind / name


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the entry folder `path`, or None if absent or unreadable."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def check_entry(path: str | Path, key: str, *, full: bool = False) -> str | None:
    """Why the entry at `path` is not usable for `key`, or None if it is.

    Cheap: manifest present, same format and key, every listed file present with its size.
    `full` also re-hashes every file against its recorded sha256.
    """
    path = Path(path)
    if not path.is_dir():
        return NOT_BUILT
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.exists():
        return f"{MANIFEST_NAME} is missing (an interrupted build, or an older cache layout)"
    manifest = read_manifest(path)
    if manifest is None:
        return f"{MANIFEST_NAME} is unreadable"
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("key") != key:
        return "built for another key (other settings or an older version of its builder)"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST_NAME} lists no files"
    for rel, recorded in files.items():
        file = path / rel
        try:
            size = file.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != recorded.get("size"):
            return f"{rel} has {size} bytes, expected {recorded.get('size')}"
        if full and file_sha256(file) != recorded.get("sha256"):
            return f"{rel} has the wrong sha256"
    return None


def get_or_build(root: str | Path, kind: str, key_obj: Any, build: Callable[[Path], dict | None],
                 load: Callable[[Path], T], *, version: int = 1, name: str | None = None,
                 full_verify: bool = False, desc: str = "") -> tuple[T, EntryInfo]:
    """`load(entry)` of the cache entry for `key_obj`, building it with `build(tmp)` first when
    it is missing, damaged or unloadable. Returns (loaded value, EntryInfo).

    `build(out)` fills the empty folder `out` and returns facts for the manifest's ``info``
    (or None); `load(path)` reads the finished entry (any exception counts as a bad entry).
    `name`: the entry's folder name instead of its key (the key is still checked).
    `desc`: how log lines name the entry (default ``"<kind> <name>"``).
    """
    start = time.perf_counter()
    key = entry_key(kind, key_obj, version)
    path = entry_path(root, kind, name or key)
    desc = desc or f"{kind} {path.name}"

    def hit(value: T) -> tuple[T, EntryInfo]:
        info = (read_manifest(path) or {}).get("info") or {}
        log.debug("%s: cache hit %s", desc, path)
        return value, EntryInfo(path, key, True, time.perf_counter() - start, info)

    state = _usable(path, key, full_verify, load)
    if isinstance(state, _Loaded):
        return hit(state.value)
    with _entry_lock(path, desc):
        state = _usable(path, key, full_verify, load)  # another process may have built it
        if isinstance(state, _Loaded):
            return hit(state.value)
        if state == NOT_BUILT:
            log.info("%s: building into %s", desc, path)
        else:
            log.warning("%s at %s is incomplete or damaged (%s); rebuilding it", desc, path, state)
        _remove_leftovers(path)
        info = _build(path, kind, key, key_obj, version, build)
    value = load(path)  # a fresh entry that does not load is a bug in build/load: raise
    return value, EntryInfo(path, key, False, time.perf_counter() - start, info)


def adopt_entry(root: str | Path, kind: str, key_obj: Any, files: dict[str, dict], *,
                version: int = 1, name: str | None = None, info: dict | None = None) -> bool:
    """Take over a finished entry of an older cache layout: write this module's manifest into
    it, for `files` (``{relpath: {"size", "sha256"}}`` as the old layout recorded them), when
    every one is present with its size. Returns whether the entry is now usable."""
    key = entry_key(kind, key_obj, version)
    path = entry_path(root, kind, name or key)
    with _entry_lock(path, f"{kind} {path.name}"):
        if check_entry(path, key) is None:
            return True  # adopted meanwhile by another process
        for rel, recorded in files.items():
            file = path / rel
            if not file.is_file() or file.stat().st_size != recorded.get("size"):
                return False
        _write_manifest(path, kind, key, key_obj, version, files, info or {}, build_seconds=None)
    log.info("%s %s: adopted an entry of an older cache layout", kind, path.name)
    return True


@dataclass
class _Loaded:
    value: Any


def _usable(path: Path, key: str, full: bool, load: Callable[[Path], Any]) -> _Loaded | str:
    """The loaded entry, or why it cannot be used."""
    problem = check_entry(path, key, full=full)
    if problem is not None:
        return problem
    try:
        return _Loaded(load(path))
    except Exception as e:  # noqa: BLE001  (an unloadable entry is rebuilt, never trusted)
        return f"it does not load ({type(e).__name__}: {e})"


class _entry_lock:
    """An exclusive lock per entry; says so in the log when it has to wait for another process."""

    def __init__(self, path: Path, desc: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(path.parent / f".{path.name}.lock"))
        self.desc = desc

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: waiting for another process that is building it", self.desc)
            self.lock.acquire()

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _remove_leftovers(path: Path) -> None:
    """Temporary folders of killed builds of this entry (the names `atomic_directory` uses);
    called under the entry's lock, so none of them belongs to a live build."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([a-z0-9_]{{8}}\.tmp|old-\d+)")
    for p in path.parent.iterdir():
        if p.is_dir() and pattern.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _build(path: Path, kind: str, key: str, key_obj: Any, version: int,
           build: Callable[[Path], dict | None]) -> dict[str, Any]:
    start = time.perf_counter()
    info: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        info.update(build(tmp) or {})
        files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
        _write_manifest(tmp, kind, key, key_obj, version, files, info,
                        build_seconds=round(time.perf_counter() - start, 1))
        # mkdtemp/mkstemp create private (0700/0600) entries; a cache may be shared.
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

    atomic_directory(path, fill)
    return info


def _write_manifest(path: Path, kind: str, key: str, key_obj: Any, version: int,
                    files: dict[str, dict], info: dict, build_seconds: float | None) -> None:
    atomic_write_json(path / MANIFEST_NAME, {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "key": key,
        "version": version,
        "key_object": key_obj,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": build_seconds,
        "total_size": sum(f["size"] for f in files.values()),
        "files": files,
        "info": info,
    })
    (path / MANIFEST_NAME).chmod(0o644)
