"""Building a Lightning Trainer from the `trainer` config group."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import OmegaConf


def make_trainer(trainer_cfg, output_dir: str | Path, logger=False, callbacks=(),
                 **overrides) -> L.Trainer:
    """Pass every key of the trainer group to L.Trainer; `overrides` win."""
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True) if not isinstance(
        trainer_cfg, dict) else dict(trainer_cfg)
    kwargs.update(overrides)
    kwargs.setdefault("enable_model_summary", False)
    return L.Trainer(default_root_dir=str(output_dir), logger=logger, callbacks=list(callbacks),
                     **kwargs)
