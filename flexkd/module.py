"""DistillationModule: the LightningModule that wraps teacher, student and a strategy.

It orchestrates and owns no method logic: it never branches on a strategy's name. The
teacher is frozen, kept in eval mode, and held outside the module's registered children, so
it is in neither the optimizer nor any checkpoint.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from flexkd.models import ModelOutputs, TaskModel, transformer_blocks
from flexkd.step import LiveTeacher, TeacherOutputs, check_finite, distill_terms, normalise_to_step
from flexkd.strategies.base import Strategy


class DistillationModule(L.LightningModule):
    def __init__(self, student: TaskModel, strategy: Strategy, teacher: TaskModel | None = None,
                 lr: float = 5e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                 trainable_layers: int | None = None,
                 teacher_outputs: TeacherOutputs | None = None, fused: bool = True):
        super().__init__()
        self.student = student
        self.strategy = strategy
        # Not an attribute nn.Module tracks: no optimizer, no state_dict, no DDP gradient sync.
        object.__setattr__(self, "_teacher", teacher)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # The single place the teacher is asked for outputs; a store of them may stand in.
        self.teacher_outputs = teacher_outputs or (LiveTeacher(teacher, strategy)
                                                   if teacher is not None else None)
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.fused = fused
        if trainable_layers is not None:
            freeze_lower_layers(student, trainable_layers)

    @property
    def teacher(self) -> TaskModel | None:
        return self._teacher

    def student_outputs(self, batch: dict) -> ModelOutputs:
        return self.student(batch["student"], layers=self.strategy.student_layers())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        terms = distill_terms(self.strategy, self.student, batch, self.teacher_outputs)
        check_finite(terms, self.global_step)
        batch_size = batch["index"].numel()
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        # Logged: this micro-batch's means. Returned: its share of the step's loss.
        self.log("train/loss", sum(terms.values()), prog_bar=True, batch_size=batch_size)
        return sum(normalise_to_step(terms, batch, self.strategy.additive_terms()).values())

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
        optimizer = adamw(params, lr=self.lr, weight_decay=self.weight_decay,
                          fused=self.fused and fused_allowed(self.trainer))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # Linear warmup, then a half cosine from lr down to 10% of lr at the last step.
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, int(total * self.warmup_ratio), total, min_lr_rate=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and unscaled_mixed_precision(plugin):
            # bf16-mixed keeps no gradient scaler, so there is nothing to unscale and the
            # gradients clip as fp32's do. Lightning's mixed-precision plugin refuses a fused
            # optimizer whether or not it has a scaler, so clip with the base plugin's code.
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def unscaled_mixed_precision(plugin) -> bool:
    """Mixed precision without a gradient scaler: bf16-mixed (16-mixed scales its loss)."""
    return isinstance(plugin, MixedPrecision) and plugin.scaler is None


def fused_allowed(trainer: L.Trainer) -> bool:
    """Whether this trainer can step a fused optimizer. Under 16-mixed Lightning refuses to clip
    one's gradients (the fused step would unscale them itself, after the clip);
    `DistillationModule.configure_gradient_clipping` clips them under bf16-mixed, which has no
    scaler. Sharding strategies (FSDP, DeepSpeed) step and clip their own way. So: one process
    or DDP, and no clipping of fp16-scaled gradients."""
    plugin = trainer.precision_plugin
    scaled_with_clipping = (isinstance(plugin, MixedPrecision) and plugin.scaler is not None
                            and bool(trainer.gradient_clip_val))
    return isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy) and not scaled_with_clipping


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
          fused: bool = True) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel where the parameters' device has one (CPU, CUDA) and
    `fused` (see `fused_allowed`) permits it.

    Same update, less time: one step over 33M fp32 parameters took 0.030 s fused against
    0.236 s with the default kernel on a 2-core CPU. Inside a whole run.py step the gain was
    smaller (sft, 40 steps: 35.1-35.4 s against 36.1-37.9 s)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    # Checked here: torch checks devices only at the first step, and fails there.
    devices = _get_fused_kernels_supported_devices()
    fused = fused and all(p.is_floating_point() and p.device.type in devices for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


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
