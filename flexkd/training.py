"""Building a Lightning Trainer from the `trainer` config group."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from flexkd.progress import ProgressLine

log = logging.getLogger(__name__)


def make_trainer(trainer_cfg, output_dir: str | Path, logger=False, callbacks=(),
                 progress: str = "train", **overrides) -> L.Trainer:
    """Pass every key of the trainer group to L.Trainer; `overrides` win. Training progress
    is logged under the name `progress` (see ProgressLog)."""
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True) if not isinstance(
        trainer_cfg, dict) else dict(trainer_cfg)
    kwargs.update(overrides)
    kwargs.setdefault("enable_model_summary", False)
    # The train sampler shards itself across ranks (flexkd.data.sampling).
    kwargs.setdefault("use_distributed_sampler", False)
    return L.Trainer(default_root_dir=str(output_dir), logger=logger,
                     callbacks=[*callbacks, ProgressLog(progress)], **kwargs)


class ProgressLog(L.Callback):
    """Log "step i/N, loss x, elapsed, eta" every `fraction` of the steps or `seconds`,
    whichever comes first: a piped or logged run shows progress (the progress bar draws only
    on a terminal)."""

    def __init__(self, name: str = "train", fraction: float = 0.1, seconds: float = 30.0):
        self.name, self.fraction, self.seconds = name, fraction, seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # start: the steps done before a resume do not count as this run's speed
        self.line = ProgressLine(self.name, max(int(trainer.estimated_stepping_batches), 1),
                                 self.fraction, self.seconds, quiet=0.0,
                                 start=trainer.global_step, unit="step ", logger=log)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            self.line.update(trainer.global_step, lambda: loss_text(trainer))


def loss_text(trainer: L.Trainer) -> str:
    loss = trainer.callback_metrics.get("train/loss")
    return f"loss {'-' if loss is None else f'{float(loss):.4f}'}"


def runtime_device(trainer_cfg) -> torch.device:
    """Where stages outside Lightning (probe, evaluation) run: the trainer's accelerator."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def precision_key(trainer_cfg) -> str:
    """The numeric regime of a stage run under `trainer_cfg` (bf16, fp16 or fp32), for cache
    keys: a teacher fine-tuned, probed or stored under bf16 differs from one under fp32 beyond
    rounding, so each regime gets its own entries."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32"


def autocast(trainer_cfg, device: torch.device):
    """The trainer's mixed precision for stages outside Lightning (probe, evaluation)."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
