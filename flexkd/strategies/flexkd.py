"""Flex-KD (Saadi & Wang, arXiv 2507.10155): parameter-free, task-driven feature distillation.

Setup runs the importance probe on the teacher (cached); student dim i is then paired with
teacher dim S[i] (or with direction U[:, i] under the `directions` extension) and matched
with a correlation loss. No trainable parameters are added.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.importance import ProbeConfig, cached_probe
from flexkd.strategies.base import OutputRequest, SetupContext, paired_tokens, register
from flexkd.strategies.features import FeatureStrategy

log = logging.getLogger(__name__)

FEATURE_LOSSES = ("corr", "corr_diag", "mse", "cosine")


@register("flexkd")
class FlexKD(FeatureStrategy):
    def __init__(self, beta: float = 0.1, score: str = "grad", selection: str = "coordinates",
                 target: str = "gold", k: int | None = None, feature_loss: str = "corr",
                 lam: float = 5e-3, reduction: str = "mean", probe_examples: int = 1024,
                 probe_batch_size: int = 16, **kwargs):
        super().__init__(beta=beta, **kwargs)
        if feature_loss not in FEATURE_LOSSES:
            raise ConfigError(f"strategy.feature_loss={feature_loss!r}; choose one of {FEATURE_LOSSES}")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"strategy.reduction={reduction!r}; choose mean or sum")
        if k is not None and k < 1:
            raise ConfigError(f"strategy.k must be >= 1 (or null for the student width), got {k}")
        if lam < 0:
            raise ConfigError(f"strategy.lam must be >= 0, got {lam}")
        self.score, self.selection_kind, self.target = score, selection, target
        self.k, self.feature_loss, self.lam, self.reduction = k, feature_loss, lam, reduction
        self.probe_examples, self.probe_batch_size = probe_examples, probe_batch_size
        self.probes: list[dict] = []

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        d_s, d_t = ctx.student.hidden_size, ctx.teacher.hidden_size
        k = self.k or d_s
        if k > d_s:
            raise ConfigError(f"strategy.k={k} exceeds the student width d_S={d_s}")
        if k > d_t:
            log.warning("k=%d >= teacher width d_T=%d: keeping all %d teacher dims; student dims "
                        "beyond %d are not constrained", k, d_t, d_t, d_t)
            k = d_t
        self.k_effective = k
        loader = ctx.datamodule.probe_dataloader(self.probe_examples, self.probe_batch_size)
        self.probes = []
        for i, (_, t_layer) in enumerate(self.resolved_pairs):
            cfg = ProbeConfig(layer=t_layer, score=self.score, selection=self.selection_kind,
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
            return teacher_rows.float() @ sel
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

    def diagnostics(self) -> dict:
        return {"probes": self.probes, "k": getattr(self, "k_effective", self.k),
                "feature_loss": self.feature_loss}
