"""Periodic, atomic training checkpoints and exact resume.

`ResumeCheckpoint` writes `<output_dir>/checkpoints/last.ckpt` every N optimizer steps by
saving to a temporary file and renaming it into place, so a run killed at any instant leaves
either the previous or the new checkpoint, never a torn one. The checkpoint holds what
Lightning saves (student, strategy state such as a projector or the Flex-KD selection,
optimizer, LR scheduler, loop progress) plus the RNG states and the seconds trained so far;
on resume the batch sampler is fast-forwarded to the batch the interrupted run would have
drawn next, and a resumed job's reported training time adds the earlier attempts' seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from flexkd.storage import atomic_write_json

log = logging.getLogger(__name__)

LAST = "last.ckpt"
LAST_INFO = "last.json"


def rng_state() -> dict:
    # Plain tensors and tuples only, so checkpoints load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_path(checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from, if a complete one exists."""
    path = Path(checkpoint_dir) / LAST
    return path if path.is_file() else None


def drop_resume_checkpoint(checkpoint_dir: Path) -> None:
    """Delete the resume checkpoint (student and optimizer state: 270 MB for all-MiniLM-L6-v2;
    the 15 kept by a finished sweep once filled the disk)."""
    for name in (LAST, LAST_INFO):
        (Path(checkpoint_dir) / name).unlink(missing_ok=True)


@contextlib.contextmanager
def exact_mid_epoch_resume():
    """Silence Lightning's warning that a mid-epoch resume "can cause unreliable results" because
    the dataloader has no state_dict: ResumeCheckpoint fast-forwards the batch sampler to the
    batch the interrupted run would have drawn next, and a resumed run ends with the
    uninterrupted one's metrics (tests/test_resume.py), so that warning would only mislead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PossibleUserWarning,
                                message="You're resuming from a checkpoint that ended before")
        yield


class ResumeCheckpoint(L.Callback):
    def __init__(self, checkpoint_dir: str | Path, every_n_steps: int):
        self.dir = Path(checkpoint_dir)
        self.every = max(int(every_n_steps), 1)
        self.resumed_from = resume_path(self.dir)  # None: this run starts afresh
        self._restored_rng: dict | None = None
        # Training seconds of the attempts before this one, up to the checkpoint resumed from
        # (the steps they ran past it are run again, and counted again, here).
        self.seconds_before_resume = 0.0
        self._started: float | None = None

    # Lightning stores this dict in the checkpoint under the callback's state key.
    def state_dict(self) -> dict:
        now = time.perf_counter()
        trained = now - self._started if self._started is not None else 0.0
        return {"rng": rng_state(), "train_seconds": self.seconds_before_resume + trained}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_rng = state_dict.get("rng")
        self.seconds_before_resume = float(state_dict.get("train_seconds", 0.0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        if trainer.global_step == 0:
            return
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "fast_forward"):
            # Lightning steps the optimizer at an epoch's end even when its last accumulation
            # window is short, so an epoch holds ceil(batches / accumulate) optimizer steps.
            accumulate = trainer.accumulate_grad_batches
            steps_per_epoch = -(-len(sampler) // accumulate)
            epoch, steps_into_epoch = divmod(trainer.global_step, steps_per_epoch)
            sampler.set_epoch(epoch)
            sampler.fast_forward(steps_into_epoch * accumulate)
        if self._restored_rng is not None:
            set_rng_state(self._restored_rng)
        log.info("resumed at step %d from %s", trainer.global_step, self.dir / LAST)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step != getattr(self, "_last_saved", None):
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != getattr(self, "_last_saved", None):
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{LAST}.tmp-{os.getpid()}"
        # Every rank must call this; rank 0 writes. The whole state (optimizer, callbacks) is
        # what a resume needs; saying so also stops Lightning logging its default each save.
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.dir / LAST)
            atomic_write_json(self.dir / LAST_INFO, {"step": trainer.global_step,
                                                     "epoch": trainer.current_epoch})
        self._last_saved = trainer.global_step

