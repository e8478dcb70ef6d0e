"""Building a Lightning Trainer from the `trainer` config group."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf


def make_trainer(trainer_cfg, output_dir: str | Path, logger=False, callbacks=(),
                 **overrides) -> L.Trainer:
    """Pass every key of the trainer group to L.Trainer; `overrides` win."""
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True) if not isinstance(
        trainer_cfg, dict) else dict(trainer_cfg)
    kwargs.update(overrides)
    kwargs.setdefault("enable_model_summary", False)
    # The train sampler shards itself across ranks (flexkd.data.sampling).
    kwargs.setdefault("use_distributed_sampler", False)
    return L.Trainer(default_root_dir=str(output_dir), logger=logger, callbacks=list(callbacks),
                     **kwargs)


def runtime_device(trainer_cfg) -> torch.device:
    """Where stages outside Lightning (probe, evaluation) run: the trainer's accelerator."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(trainer_cfg, device: torch.device):
    """The trainer's mixed precision for stages outside Lightning (probe, evaluation)."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
