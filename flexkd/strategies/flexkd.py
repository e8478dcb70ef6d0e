"""Flex-KD (Saadi & Wang, arXiv 2507.10155): parameter-free, task-driven feature distillation.

Setup runs the importance probe on the teacher (cached); student dim i is then paired with
teacher dim S[i] (or with direction U[:, i] under the `directions` extension) and matched
with a correlation loss. No trainable parameters are added.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from pydantic import Field

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.importance import SCORES, SELECTIONS, TARGETS, ProbeConfig, cached_probe
from flexkd.model_info import ModelInfo
from flexkd.strategies.base import FeatureWeight, OutputRequest, SetupContext, paired_tokens
from flexkd.strategies.features import FeatureStrategy

log = logging.getLogger(__name__)

FEATURE_LOSSES = ("corr", "corr_diag", "mse", "cosine")


class FlexKD(FeatureStrategy):
    name = "flexkd"

    class Knobs(FeatureStrategy.Knobs):
        # corr 'mean' starts near 1.0, below a typical task CE; 0.5 was also the choice on validation
        # of experiment=beta_sweep (0.1-2.0, 3 seeds).
        beta: FeatureWeight = 0.5
        score: Literal[SCORES] = Field(ProbeConfig.score,
                                       description="the importance score of teacher dims")
        selection: Literal[SELECTIONS] = Field(
            ProbeConfig.selection,
            description="what the probe keeps (directions: task-tangent eigenvectors)")
        target: Literal[TARGETS] = Field(ProbeConfig.target, description="the probe's target "
                                         "(predicted: the teacher's argmax)")
        k: int | None = Field(None, ge=1, description="teacher dims to keep; null: the student width")
        feature_loss: Literal[FEATURE_LOSSES] = Field("corr", description="the feature loss")
        lam: float = Field(5e-3, ge=0, description="the off-diagonal weight of the corr loss")
        reduction: Literal["mean", "sum"] = Field("mean", description="how the feature loss is "
                                                  "reduced (mean: divide by k)")
        probe_examples: int = Field(ProbeConfig.examples, ge=2, description="probe examples, split "
                                    "in two halves for stability")
        probe_batch_size: int = Field(ProbeConfig.batch_size, ge=1, description="probe batch size")

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.probes: list[dict] = []

    def check_pair(self, student: ModelInfo, teacher: ModelInfo) -> None:
        if self.k is not None and student.width is not None and self.k > student.width:
            raise ConfigError(f"strategy.k={self.k} exceeds the student width d_S={student.width} "
                              f"(student {student.name}); use k <= {student.width}, or k=null for "
                              "the student width")
        super().check_pair(student, teacher)

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        d_s, d_t = ctx.student.hidden_size, ctx.teacher.hidden_size
        k = self.k or d_s
        if k > d_t:
            log.warning("k=%d >= teacher width d_T=%d: keeping all %d teacher dims; student dims "
                        "beyond %d are not constrained", k, d_t, d_t, d_t)
            k = d_t
        self.k_effective = k
        loader = ctx.datamodule.probe_dataloader(self.probe_examples, self.probe_batch_size)
        self.probes = []
        for i, (_, t_layer) in enumerate(self.resolved_pairs):
            cfg = ProbeConfig(layer=t_layer, score=self.score, selection=self.selection,
                              target=self.target, k=k, examples=self.probe_examples,
                              batch_size=self.probe_batch_size, seed=ctx.seed)
            result = cached_probe(ctx.teacher, loader, cfg, ctx.cache_dir, ctx.teacher_fingerprint,
                                  ctx.datamodule.task.fingerprint())
            # A buffer, so the selection travels with checkpoints and to the right device.
            self.register_buffer(f"selection_{i}", result.selection.clone(), persistent=True)
            self.probes.append(result.diagnostics())

    def teacher_targets(self, teacher_rows: torch.Tensor, index: int) -> torch.Tensor:
        sel = getattr(self, f"selection_{index}")
        if sel.dim() == 2:  # directions extension: project onto task-tangent eigenvectors
            # In fp32 also under autocast, which would run this matmul in bf16.
            with torch.autocast(teacher_rows.device.type, enabled=False):
                return teacher_rows.float() @ sel.float()
        return teacher_rows[:, sel]

    def teacher_request(self) -> OutputRequest:
        """Only the selected dims (directions: the projections) of the teacher's states."""
        request = super().teacher_request()
        if not request.layers:
            return request
        views = tuple(getattr(self, f"selection_{i}") for i in range(len(self.resolved_pairs)))
        return dataclasses.replace(request, views=views)

    def feature_losses(self, batch, teacher, student):
        if not teacher.reduced:
            return super().feature_losses(batch, teacher, student)
        # A store's answer: the teacher rows are already the targets.
        total = sum(self.target_loss(*paired_tokens(batch, teacher, student, pair))
                    for pair in self.resolved_pairs)
        return {"feature": total / len(self.resolved_pairs)}

    def pair_loss(self, student_rows, teacher_rows, index):
        return self.target_loss(student_rows, self.teacher_targets(teacher_rows, index))

    def target_loss(self, student_rows, target):
        student = student_rows[:, : target.shape[1]]
        if self.feature_loss == "corr":
            return losses.correlation_loss(student, target, self.lam, self.reduction)
        if self.feature_loss == "corr_diag":
            return losses.correlation_loss(student, target, 0.0, self.reduction)
        if self.feature_loss == "mse":
            return losses.mse(student, target)
        return losses.cosine_loss(student, target)

    @property
    def feature_is_row_mean(self) -> bool:
        return self.feature_loss in ("mse", "cosine")  # corr z-scores over the batch's tokens

    def diagnostics(self) -> dict:
        return {"probes": self.probes, "k": getattr(self, "k_effective", self.k),
                "feature_loss": self.feature_loss}
