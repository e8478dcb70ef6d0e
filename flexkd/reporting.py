"""results.json and the end-of-run summary printed to the terminal."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from flexkd.storage import atomic_write_json

PACKAGES = ("torch", "lightning", "transformers", "hydra-core", "omegaconf", "lm-eval", "wandb")


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }


def write_results(output_dir: Path, results: dict) -> Path:
    path = Path(output_dir) / "results.json"
    atomic_write_json(path, results)
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def summary_table(results: dict) -> str:
    """A short human-readable table of the run's main numbers."""
    metrics = results["metrics"]
    main = results.get("main_metric")
    lines = [f"flexkd  pair={results['pair']}  task={results['task']}  "
             f"strategy={results['strategy']}  seed={results['seed']}"]
    rows = [("teacher (test)", metrics.get("teacher", {}))] + (
        [("student (test)", metrics["student"])] if "student" in metrics else [])  # removal: none
    keys = [k for k in ("accuracy", "macro_f1", "loss", "perplexity", "rougeL") if
            any(k in m for _, m in rows)]
    lines.append(f"  {'model':<22}" + "".join(f"{k:>12}" for k in keys))
    for name, m in rows:
        lines.append(f"  {name:<22}" + "".join(f"{_fmt(m.get(k, '-')):>12}" for k in keys))
    lines.append("  timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                              results["timings"].items()))
    if main:
        side = "student" if "student" in metrics else "teacher"
        lines.append(f"  main metric: {side} {main} = {_fmt(metrics[side].get(main))}")
    lines.append(f"  results: {results['paths']['results']}")
    lines.append(f"  logs:    {results['paths']['logs']}")
    return "\n".join(lines)
