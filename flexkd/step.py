"""One distillation step: teacher outputs -> student outputs -> the strategy's loss terms.

The LightningModule, the speed benchmark and the tests all run this one function, so what a
step computes is defined once. The teacher is reached only through a `TeacherOutputs`
callable (batch -> outputs): `LiveTeacher` runs the frozen model; a store of precomputed
outputs can stand in without touching the step. Strategies never import Lightning, and
neither does this module.
"""

from __future__ import annotations

from typing import Protocol

import torch

from flexkd.errors import NonFiniteLossError
from flexkd.models import ModelOutputs, TaskModel
from flexkd.strategies.base import Strategy


class TeacherOutputs(Protocol):
    def __call__(self, batch: dict) -> ModelOutputs | None:
        """The teacher's outputs on `batch` that the strategy requested."""


class LiveTeacher:
    """Asks a frozen teacher model for exactly what `strategy.teacher_request()` names."""

    def __init__(self, teacher: TaskModel, strategy: Strategy):
        self.teacher, self.strategy = teacher, strategy

    def __call__(self, batch: dict) -> ModelOutputs | None:
        if not self.strategy.needs_teacher:
            return None
        inputs = batch["teacher"]
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        # eval every call: a trainer's .train() on its module must never turn dropout on here.
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(inputs, layers=self.strategy.teacher_request().layers)


def distill_terms(strategy: Strategy, student: TaskModel, batch: dict,
                  teacher_outputs: TeacherOutputs | None) -> dict[str, torch.Tensor]:
    """The strategy's named, weighted loss terms for one batch (their sum is the loss).

    The teacher is asked only when the strategy needs it, so a strategy without teacher terms
    runs with `teacher_outputs=None`."""
    teacher = None
    if strategy.needs_teacher:
        if teacher_outputs is None:
            raise ValueError(f"strategy {strategy.name!r} needs teacher outputs, but none were given")
        teacher = teacher_outputs(batch)
    student_out = student(batch["student"], layers=strategy.student_layers())
    return strategy.losses(batch, teacher, student_out)


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop at the first non-finite term, naming it and the step (the checkpoint callback has
    kept the last good state)."""
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(
                f"loss term {name!r} is {value.item()} at step {step}; the last good checkpoint "
                "is kept. Lower the learning rate or this term's weight.")
