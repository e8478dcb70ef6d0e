"""The strategy interface and registry (DESIGN.md: "the one seam that matters").

A strategy is an nn.Module (so a projector trains and checkpoints naturally) that turns one
batch's student and teacher outputs into named, already-weighted loss terms. Every strategy
shares the SPEC objective skeleton L = alpha * L_task + beta * L_feat + gamma * L_logit;
subclasses only supply the feature terms. Strategies never import Lightning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.models import ModelOutputs, TaskModel

STRATEGIES: dict[str, type[Strategy]] = {}
DIVERGENCES = ("forward", "reverse", "jsd")


def register(name: str):
    def wrap(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return wrap


def build_strategy(name: str, **kwargs) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid strategies: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


@dataclass
class SetupContext:
    """What a strategy may use once, before training."""

    teacher: TaskModel | None
    student: TaskModel
    datamodule: Any
    cache_dir: str | None = None
    teacher_fingerprint: str = ""
    seed: int = 0
    info: dict = field(default_factory=dict)  # strategies write diagnostics here


@dataclass(frozen=True, eq=False)
class OutputRequest:
    layers: tuple[int, ...] = ()
    logits: bool = False
    # Per layer, what the strategy reads of the state: None (all of it), a 1-D LongTensor of
    # dims, or a (d, k) projection. A teacher-output store keeps only that (flexkd: k of d_T).
    views: tuple = ()

    def apply(self, outputs: ModelOutputs) -> ModelOutputs:
        """`outputs` with each requested layer reduced to its view (as a store holds it)."""
        if outputs is None or outputs.reduced or not any(v is not None for v in self.views):
            return outputs
        hidden = dict(outputs.hidden)
        for layer, view in zip(self.layers, self.views, strict=True):
            if view is not None:
                h = outputs.hidden[layer]
                hidden[layer] = h[..., view] if view.dim() == 1 else h.float() @ view
        return dataclasses.replace(outputs, hidden=hidden, reduced=True)


class Strategy(nn.Module):
    name: ClassVar[str] = "base"

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, gamma: float = 0.0,
                 temperature: float = 2.0, divergence: str = "forward",
                 layer_pairs: list | None = None):
        super().__init__()
        for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ConfigError(f"strategy.{key} must be >= 0, got {value}")
        if temperature <= 0:
            raise ConfigError(f"strategy.temperature must be > 0, got {temperature}")
        if divergence not in DIVERGENCES:
            raise ConfigError(f"strategy.divergence={divergence!r}; choose one of {DIVERGENCES}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.temperature, self.divergence = float(temperature), divergence
        pairs = [(-1, -1)] if layer_pairs is None else [tuple(p) for p in layer_pairs]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"strategy.layer_pairs must be [student_layer, teacher_layer] pairs, "
                              f"got {layer_pairs}")
        self.layer_pairs = pairs
        self.resolved_pairs: list[tuple[int, int]] = []

    # ------------------------------------------------------------ what to ask the models for
    @property
    def uses_features(self) -> bool:
        return False

    @property
    def feature_term_active(self) -> bool:
        """Hidden states are only worth asking for when the feature term counts (beta > 0)."""
        return self.uses_features and self.beta > 0

    def teacher_request(self) -> OutputRequest:
        layers = tuple(t for _, t in self.resolved_pairs) if self.feature_term_active else ()
        return OutputRequest(layers=layers, logits=self.gamma > 0)

    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.resolved_pairs) if self.feature_term_active else ()

    @property
    def needs_teacher(self) -> bool:
        request = self.teacher_request()
        return bool(request.layers) or request.logits

    # ------------------------------------------------------------ setup
    def setup(self, ctx: SetupContext) -> None:
        """Validate the pair against this strategy and prepare (probe, projector init)."""
        if self.needs_teacher_for_config() and ctx.teacher is None:
            raise ConfigError(f"strategy {self.name!r} needs a teacher")
        if ctx.teacher is not None:
            self.resolved_pairs = [(ctx.student.layer_index(s), ctx.teacher.layer_index(t))
                                   for s, t in self.layer_pairs]
        if self.gamma > 0:
            check_logit_compatible(ctx.teacher, ctx.student, ctx.datamodule)

    def needs_teacher_for_config(self) -> bool:
        return self.uses_features or self.gamma > 0

    # ------------------------------------------------------------ losses
    def feature_losses(self, batch: dict, teacher: ModelOutputs,
                       student: ModelOutputs) -> dict[str, torch.Tensor]:
        """Unweighted feature terms; multiplied by beta in `losses`. None by default."""
        return {}

    def losses(self, batch: dict, teacher: ModelOutputs | None,
               student: ModelOutputs) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            terms["task"] = self.alpha * student.loss
        if self.gamma > 0:
            terms["logit"] = self.gamma * losses.logit_divergence(
                student.kd_logits, teacher.kd_logits, self.temperature, self.divergence)
        if self.feature_term_active:
            for name, value in self.feature_losses(batch, teacher, student).items():
                terms[name] = self.beta * value
        return terms

    def extra_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def diagnostics(self) -> dict:
        return {}


def feature_mask(batch: dict) -> torch.Tensor:
    """Tokens that feature losses compare: non-padding student tokens (aligned to the teacher's)."""
    return batch["student"]["attention_mask"].bool()


def paired_tokens(batch, teacher: ModelOutputs, student: ModelOutputs, pair):
    """(M, d_S), (M, d_T) rows of the valid tokens of one (student_layer, teacher_layer) pair."""
    mask = feature_mask(batch)
    s_layer, t_layer = pair
    return (losses.masked_tokens(student.hidden[s_layer], mask),
            losses.masked_tokens(teacher.hidden[t_layer], mask))


def check_logit_compatible(teacher: TaskModel, student: TaskModel, datamodule) -> None:
    if teacher.kind != student.kind or teacher.num_outputs != student.num_outputs:
        raise ConfigError(
            f"logit KD needs a shared label space / vocabulary: the teacher has "
            f"{teacher.num_outputs} outputs and the student {student.num_outputs}. Use a pair with "
            "one tokenizer, or set strategy.gamma=0 (feature strategies: flexkd, projection, cka)."
        )
    toks = getattr(datamodule, "tokenizers", None)
    if teacher.kind == "causal_lm" and toks and not datamodule.shared:
        if toks["teacher"].get_vocab() != toks["student"].get_vocab():
            raise ConfigError("logit KD needs one vocabulary, but the teacher's and student's "
                              "tokenizers map tokens differently; use a same-tokenizer pair")
