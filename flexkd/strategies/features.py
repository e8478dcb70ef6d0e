"""Feature-matching baselines: raw MSE, a learned projection, and CKA."""

from __future__ import annotations

import abc

import torch
from torch import nn

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.model_info import ModelInfo
from flexkd.strategies.base import FeatureWeight, SetupContext, Strategy, paired_tokens


class FeatureStrategy(Strategy, abc.ABC):
    """A strategy with a feature term: beta * mean over layer pairs of `pair_loss`."""

    class Knobs(Strategy.Knobs):
        beta: FeatureWeight = 1.0

    @property
    def uses_features(self) -> bool:
        return True

    @abc.abstractmethod
    def pair_loss(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor,
                  index: int) -> torch.Tensor:
        """The feature loss of one layer pair on (M, d_S) and (M, d_T) token rows."""

    def feature_losses(self, batch, teacher, student):
        total = sum(self.pair_loss(*paired_tokens(batch, teacher, student, pair), index=i)
                    for i, pair in enumerate(self.resolved_pairs))
        return {"feature": total / len(self.resolved_pairs)}


class RawFeatures(FeatureStrategy):
    """MSE between full hidden states of paired layers; needs d_S == d_T."""

    name = "raw"

    def check_pair(self, student: ModelInfo, teacher: ModelInfo) -> None:
        d_s, d_t = student.width, teacher.width
        if None not in (d_s, d_t) and d_s != d_t:
            raise ConfigError(
                f"strategy={self.name} needs equal widths, but the student {student.name} has "
                f"d_S={d_s} and the teacher {teacher.name} d_T={d_t}; use strategy=projection "
                "(learned Linear d_S->d_T) or strategy=flexkd (parameter-free selection of d_S "
                "teacher dims).")
        super().check_pair(student, teacher)

    def pair_loss(self, student_rows, teacher_rows, index):
        return losses.mse(student_rows, teacher_rows)

    feature_is_row_mean = True


class Projection(FeatureStrategy):
    """Learned Linear(d_S -> d_T) on the student state, MSE to the full teacher state.

    The projector trains with the student and is not part of the exported student.
    """

    name = "projection"

    class Knobs(FeatureStrategy.Knobs):
        # Chosen on validation by experiment=beta_sweep (0.1-2.0, 3 seeds; 1.0 before).
        beta: FeatureWeight = 0.25

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.projectors = nn.ModuleList()

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        d_s, d_t = ctx.student.hidden_size, ctx.teacher.hidden_size
        self.projectors = nn.ModuleList(nn.Linear(d_s, d_t) for _ in self.resolved_pairs)
        self.projectors.to(next(ctx.student.parameters()).dtype)

    def pair_loss(self, student_rows, teacher_rows, index):
        projector = self.projectors[index]
        return losses.mse(projector(student_rows.to(projector.weight.dtype)), teacher_rows)

    feature_is_row_mean = True


class CKA(FeatureStrategy):
    """1 - linear CKA between student and teacher token features (any widths)."""

    name = "cka"

    class Knobs(FeatureStrategy.Knobs):
        # Chosen on validation by experiment=beta_sweep (0.1-2.0, 3 seeds; 1.0 before).
        beta: FeatureWeight = 0.5

    def pair_loss(self, student_rows, teacher_rows, index):
        return losses.cka_loss(student_rows, teacher_rows)
