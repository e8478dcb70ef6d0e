"""One distillation step: teacher outputs -> student outputs -> the strategy's loss terms.

The LightningModule, the speed benchmark and the tests all run this one function, so what a
step computes is defined once. The teacher is reached only through a `TeacherOutputs`
callable (batch -> outputs): `LiveTeacher` runs the frozen model; a store of precomputed
outputs can stand in without touching the step. Strategies never import Lightning, and
neither does this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from flexkd.data.step_units import DIVISOR
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
            return self.teacher(inputs, layers=self.strategy.teacher_request().layers,
                                all_logits=needs_all_logits(batch))


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
    student_out = student(batch["student"], layers=strategy.student_layers(),
                          all_logits=needs_all_logits(batch))
    return strategy.losses(batch, teacher, student_out)


def needs_all_logits(batch: dict) -> bool:
    """Two tokenizers: logit rows are paired by the character alignment, not by response
    position (strategies.base.logit_rows), so causal LMs give the logits of every position."""
    return "alignment" in batch


def normalise_to_step(terms: dict[str, torch.Tensor], batch: dict,
                      additive: Iterable[str]) -> dict[str, torch.Tensor]:
    """The terms as this micro-batch's share of its optimizer step's loss (flexkd.data.step_units).

    A term in `additive` is a mean over its rows; it becomes mean * rows / step_rows * divisor:
    after Lightning's division by accumulate_grad_batches and DDP's average over ranks, the step's
    gradient is that of (sum over all its rows) / (its rows), however the batch was split. Other
    terms (batch statistics), terms without a count, and batches without "step_units" (outside
    training) pass unchanged."""
    step = batch.get("step_units")
    if not step:
        return dict(terms)
    micro, out = batch["units"], {}
    for name, value in terms.items():
        if name in additive and name in step:
            # A step without any such row has a zero term; keep it connected to the graph.
            weight = micro[name] * step[DIVISOR] / step[name] if step[name] else 0.0
            value = value * weight
        out[name] = value
    return out


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop at the first non-finite term, naming it and the step (the checkpoint callback has
    kept the last good state)."""
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(
                f"loss term {name!r} is {value.item()} at step {step}; the last good checkpoint "
                "is kept. Lower the learning rate or this term's weight.")
