"""Experiment loggers: CSV always; W&B when `logger=wandb`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def build_loggers(cfg: DictConfig, out: Path, results_meta: dict) -> list:
    """Lightning loggers for one run. `results_meta` has pair, task, strategy, seed."""
    from lightning.pytorch.loggers import CSVLogger

    return [CSVLogger(save_dir=str(out), name="logs", version="")]


def finish_loggers(loggers: list, results: dict, samples: list[dict] | None = None,
                   student_dir: Path | None = None) -> None:
    """Log the run's final metrics/diagnostics and close every logger (one W&B run per job)."""
    for logger in loggers:
        logger.finalize("success")
