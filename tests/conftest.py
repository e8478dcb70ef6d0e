"""Shared fixtures: offline environment, a session-wide cache, and a run.py launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexkd.offline import set_offline_defaults

ROOT = Path(__file__).resolve().parents[1]

set_offline_defaults()
os.environ.setdefault("WANDB_MODE", "offline")

# Short budgets for end-to-end runs on 2 CPU cores.
FAST = ["trainer.max_steps=6", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "teacher_finetune.max_steps=40", "data.batch_size=16"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session: teacher fine-tunes and probes are shared by tests.

    Under pytest-xdist every worker gets its own base temp; the cache sits one level up so
    that the workers share it. Each entry is built under its own file lock (flexkd/cache.py),
    so two workers asking for one entry build it once.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "flexkd-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("flexkd-cache")


# `make test` hands test files to two xdist workers in collection order (--dist loadfile); the
# longest files go first, so that no worker is left running a long file alone at the end.
LONGEST_FILES = ("test_run_e2e.py", "test_resume.py", "test_teacher_store.py", "test_experiments.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable


class RunResult:
    def __init__(self, proc: subprocess.CompletedProcess, out_dir: Path):
        self.proc, self.out_dir = proc, out_dir
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    def results(self, sub: str = "") -> dict:
        return json.loads((self.out_dir / sub / "results.json").read_text())


@pytest.fixture
def run_cli(tmp_path, cache_dir):
    """Run `python run.py <overrides>` in a subprocess with output in tmp_path."""

    def launch(*overrides: str, multirun: bool = False, fast: bool = True, check: bool = True,
               timeout: int = 600, name: str = "out", env: dict | None = None) -> RunResult:
        out = tmp_path / name
        dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        args = [sys.executable, str(ROOT / "run.py")] + (["-m"] if multirun else [])
        args += (FAST if fast else []) + [f"cache_dir={cache_dir}", f"{dir_key}={out}"]
        args += list(overrides)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        result = RunResult(proc, out)
        if check and proc.returncode != 0:
            raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-5000:]}")
        return result

    return launch
