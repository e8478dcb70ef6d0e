"""Feature-matching baselines: raw MSE, a learned projection, and CKA."""

from __future__ import annotations

import abc

import torch
from torch import nn

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.strategies.base import SetupContext, Strategy, paired_tokens, register


class FeatureStrategy(Strategy, abc.ABC):
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


@register("raw")
class RawFeatures(FeatureStrategy):
    """MSE between full hidden states of paired layers; needs d_S == d_T."""

    def __init__(self, beta: float = 1.0, **kwargs):
        super().__init__(beta=beta, **kwargs)

    def setup(self, ctx: SetupContext) -> None:
        d_s, d_t = ctx.student.hidden_size, ctx.teacher.hidden_size
        if d_s != d_t:
            raise ConfigError(
                f"strategy=raw needs equal widths, but the student has d_S={d_s} and the teacher "
                f"d_T={d_t}; use strategy=projection (learned Linear d_S->d_T) or strategy=flexkd "
                "(parameter-free selection of d_S teacher dims)."
            )
        super().setup(ctx)

    def pair_loss(self, student_rows, teacher_rows, index):
        return losses.mse(student_rows, teacher_rows)

    feature_is_row_mean = True


@register("projection")
class Projection(FeatureStrategy):
    """Learned Linear(d_S -> d_T) on the student state, MSE to the full teacher state.

    The projector trains with the student and is not part of the exported student.
    """

    def __init__(self, beta: float = 1.0, **kwargs):
        super().__init__(beta=beta, **kwargs)
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


@register("cka")
class CKA(FeatureStrategy):
    """1 - linear CKA between student and teacher token features (any widths)."""

    def __init__(self, beta: float = 1.0, **kwargs):
        super().__init__(beta=beta, **kwargs)

    def pair_loss(self, student_rows, teacher_rows, index):
        return losses.cka_loss(student_rows, teacher_rows)
