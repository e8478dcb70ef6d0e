"""DistillationModule: the LightningModule that wraps teacher, student and a strategy.

It orchestrates and owns no method logic: it never branches on a strategy's name. The
teacher is frozen, kept in eval mode, and held outside the module's registered children, so
it is in neither the optimizer nor any checkpoint.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from flexkd.errors import NonFiniteLossError
from flexkd.models import ModelOutputs, TaskModel, transformer_blocks
from flexkd.strategies.base import Strategy


class DistillationModule(L.LightningModule):
    def __init__(self, student: TaskModel, strategy: Strategy, teacher: TaskModel | None = None,
                 lr: float = 5e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 trainable_layers: int | None = None):
        super().__init__()
        self.student = student
        self.strategy = strategy
        # Not an attribute nn.Module tracks: no optimizer, no state_dict, no DDP gradient sync.
        object.__setattr__(self, "_teacher", teacher)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        if trainable_layers is not None:
            freeze_lower_layers(student, trainable_layers)

    @property
    def teacher(self) -> TaskModel | None:
        return self._teacher

    # ------------------------------------------------------------------ teacher outputs
    def teacher_outputs(self, batch: dict) -> ModelOutputs | None:
        """The single place the teacher is asked for outputs (a cache can stand in here)."""
        if not self.strategy.needs_teacher:
            return None
        request = self.strategy.teacher_request()
        teacher = self._teacher
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        teacher.eval()
        with torch.no_grad():
            return teacher(batch["teacher"], layers=request.layers)

    def student_outputs(self, batch: dict) -> ModelOutputs:
        return self.student(batch["student"], layers=self.strategy.student_layers())

    # ------------------------------------------------------------------ steps
    def on_train_epoch_start(self) -> None:
        if self._teacher is not None:
            self._teacher.eval()

    def training_step(self, batch, batch_idx):
        terms = self.strategy.losses(batch, self.teacher_outputs(batch), self.student_outputs(batch))
        batch_size = batch["index"].numel()
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(
                    f"loss term {name!r} is {value.item()} at step {self.global_step}; the last "
                    "good checkpoint is kept. Lower the learning rate or this term's weight.")
            self.log(f"train/{name}", value, batch_size=batch_size)
        loss = sum(terms.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.student_outputs(batch)
        batch_size = batch["index"].numel()
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch_size)
        if self.student.kind == "classifier":
            acc = (out.logits.argmax(-1) == batch["student"]["labels"]).float().mean()
            self.log("val/accuracy", acc, prog_bar=True, batch_size=batch_size)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * self.warmup_ratio)

        def schedule(step: int) -> float:  # linear warmup, cosine decay to 10%
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def freeze_lower_layers(model: TaskModel, trainable_layers: int) -> None:
    """Train only the top `trainable_layers` transformer blocks and the head.

    Used to fine-tune large teachers cheaply; 0 trains the head alone. A causal LM whose
    output embeddings are tied to its input embeddings keeps them frozen (training them would
    backpropagate through every block to the input) and trains its final norm instead.
    """
    model.requires_grad_(False)
    blocks = transformer_blocks(model.backbone)
    for block in list(blocks)[len(blocks) - trainable_layers:] if trainable_layers else []:
        block.requires_grad_(True)
    head = getattr(model, "head", None)
    if head is None:
        output = model.backbone.get_output_embeddings()
        tied = output.weight is model.backbone.get_input_embeddings().weight
        head = _final_norm(model.backbone) if tied else output
    if head is not None:
        head.requires_grad_(True)


def _final_norm(backbone: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(backbone, "model", backbone)
    return getattr(inner, "norm", None)
