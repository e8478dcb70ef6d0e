"""Building a Lightning Trainer from the `trainer` config group."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

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
        self.total = max(int(trainer.estimated_stepping_batches), 1)
        self.first = trainer.global_step  # > 0 after a resume
        self.start = self.last = time.perf_counter()
        self.every = max(round(self.total * self.fraction), 1)
        self.logged = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, now = trainer.global_step, time.perf_counter()
        due = step // self.every > self.logged // self.every or now - self.last >= self.seconds
        if step == self.logged or not trainer.is_global_zero or not (due or step >= self.total):
            return
        self.logged, self.last = step, now
        elapsed = now - self.start
        eta = elapsed / max(step - self.first, 1) * max(self.total - step, 0)
        loss = trainer.callback_metrics.get("train/loss")
        log.info("%s: step %d/%d, loss %s, elapsed %s, eta %s", self.name, step, self.total,
                 "-" if loss is None else f"{float(loss):.4f}", clock(elapsed), clock(eta))


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


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
