"""The strategy interface (DESIGN.md: "the one seam that matters") and how a config builds one.

A strategy is an nn.Module (so a projector trains and checkpoints naturally) that turns one
batch's student and teacher outputs into named, already-weighted loss terms. Every strategy
shares the SPEC objective skeleton L = alpha * L_task + beta * L_feat + gamma * L_logit;
subclasses only supply the feature terms. Strategies never import Lightning.

Each class declares its knobs once, in its nested pydantic `Knobs` model (type, default,
range or choices, one-line doc); validation, error hints, the README's knob table and the
`variant` label in results.json are all read from it. A strategy YAML names its class with
Hydra's `_target_`, so a strategy outside this package needs no registration: a module on
PYTHONPATH and a YAML in a directory added with `hydra.searchpath` are enough.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, Strict
from torch import nn

from flexkd import losses
from flexkd.errors import ConfigError
from flexkd.model_info import ModelInfo
from flexkd.models import ModelOutputs, TaskModel
from flexkd.schema import STRICT, show, validate

Divergence = Literal["forward", "reverse", "jsd"]
DIVERGENCES = typing.get_args(Divergence)
# Keys of a strategy config that are not knobs.
NOT_KNOBS = ("_target_", "name")
SHIPPED_CONF = Path(__file__).resolve().parents[2] / "conf"

# Weights declared once (range and doc); each class only picks its default.
TaskWeight = Annotated[float, Field(ge=0, description="the task-loss weight")]
FeatureWeight = Annotated[float, Field(ge=0, description="the feature-loss weight")]
LogitWeight = Annotated[float, Field(ge=0, description="the logit-KD weight")]
LayerPair = Annotated[tuple[int, int], Strict(False)]  # YAML gives [s, t] lists


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


@dataclass(frozen=True)
class OutputRequest:
    layers: tuple[int, ...] = ()
    logits: bool = False


class Strategy(nn.Module):
    """Plain fine-tuning with default knobs (alpha=1, beta=0, gamma=0); gamma > 0 adds logit KD."""

    name: ClassVar[str] = "base"  # a display name; a config's `name` replaces it

    class Knobs(BaseModel):
        model_config = STRICT

        alpha: TaskWeight = 1.0
        beta: FeatureWeight = 0.0
        gamma: LogitWeight = 0.0
        temperature: float = Field(2.0, gt=0, description="the logit-KD softmax temperature T")
        divergence: Divergence = Field("forward", description="the logit-KD divergence")
        layer_pairs: list[LayerPair] = Field(
            [(-1, -1)], min_length=1,
            description="[student_layer, teacher_layer] pairs; 0 = embeddings, -1 = last layer")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Knobs become attributes: one named like a method or module state would replace it.
        taken = set(dir(Strategy)) | {"training", "knobs", "resolved_pairs"}
        shadowed = sorted(k for k in cls.Knobs.model_fields if k in taken)
        if shadowed:
            raise TypeError(f"{cls.__name__}.Knobs: knob names {shadowed} are taken by the "
                            "Strategy / nn.Module interface; rename them")

    def __init__(self, name: str | None = None, **knobs):
        super().__init__()
        if name:
            self.name = str(name)
        self.knobs = validate(type(self).Knobs, knobs, prefix="strategy",
                              what=f"strategy {self.name!r}", extra_keys=NOT_KNOBS)
        for key, value in self.knobs:
            setattr(self, key, value)
        self.layer_pairs = [tuple(p) for p in self.knobs.layer_pairs]
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

    def needs_teacher_for_config(self) -> bool:
        return self.uses_features or self.gamma > 0

    # ------------------------------------------------------------ pair rules
    def check_pair(self, student: ModelInfo, teacher: ModelInfo) -> None:
        """Raise ConfigError if this strategy cannot run on the pair. Called before any weights
        load (infos from model configs) and again in `setup` (infos from the loaded models).
        Subclasses add their own rules and call super()."""
        if not self.needs_teacher_for_config():
            return
        for i, (s_layer, t_layer) in enumerate(self.layer_pairs):
            for j, layer, info in ((0, s_layer, student), (1, t_layer, teacher)):
                n = info.depth
                if n is not None and not -(n + 1) <= layer <= n:
                    raise ConfigError(
                        f"strategy.layer_pairs[{i}][{j}]={layer} is out of range for the "
                        f"{info.role} {info.name} with {n} layers (valid: 0..{n} or -{n + 1}..-1; "
                        "0 is the embedding output, -1 the last layer)")
        if self.gamma > 0:
            check_one_vocabulary(self.gamma, student, teacher)

    # ------------------------------------------------------------ setup
    def setup(self, ctx: SetupContext) -> None:
        """Check the pair against this strategy and prepare (probe, projector init)."""
        if ctx.teacher is None:
            if self.needs_teacher_for_config():
                raise ConfigError(f"strategy {self.name!r} needs a teacher")
            return
        tokenizers = getattr(ctx.datamodule, "tokenizers", None) or {}
        self.check_pair(ModelInfo.of_model("student", ctx.student, tokenizers.get("student")),
                        ModelInfo.of_model("teacher", ctx.teacher, tokenizers.get("teacher")))
        self.resolved_pairs = [(ctx.student.layer_index(s), ctx.teacher.layer_index(t))
                               for s, t in self.layer_pairs]

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


def check_one_vocabulary(gamma: float, student: ModelInfo, teacher: ModelInfo) -> None:
    """Logit KD compares distributions over one output space: class logits of one label set
    always do; token logits need one vocabulary (same size, same token -> id map)."""
    hint = "use a pair with one tokenizer, or strategy.gamma=0 (no logit term)"
    if student.kind != teacher.kind:
        raise ConfigError(f"strategy.gamma={gamma}: logit KD needs one output space, but the "
                          f"teacher is a {teacher.kind} and the student a {student.kind}; {hint}")
    if student.kind != "causal_lm":
        return
    sizes = {i.role: i.token_count() for i in (student, teacher)}
    if None not in sizes.values() and sizes["teacher"] != sizes["student"]:
        raise ConfigError(
            f"strategy.gamma={gamma}: logit KD needs one vocabulary, but the teacher "
            f"{teacher.name} has {sizes['teacher']} output tokens (tokenizer {teacher.tokenizer}) "
            f"and the student {student.name} has {sizes['student']} (tokenizer "
            f"{student.tokenizer}); {hint}")
    if student.tokenizer != teacher.tokenizer and student.token_map() != teacher.token_map():
        raise ConfigError(
            f"strategy.gamma={gamma}: logit KD needs one vocabulary, but the tokenizers "
            f"{teacher.tokenizer} (teacher) and {student.tokenizer} (student) map tokens "
            f"differently; {hint}")


# ----------------------------------------------------------------------------- from a config

def strategy_configs(search_dirs=()) -> dict[str, Path]:
    """Strategy options by name: `strategy/*.yaml` under the shipped conf dir and under each
    directory of Hydra's search path (this run's, when Hydra runs, plus `search_dirs`)."""
    found: dict[str, Path] = {}
    for root in [SHIPPED_CONF, *_hydra_search_dirs(), *map(Path, search_dirs)]:
        for path in sorted((Path(root) / "strategy").glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def _hydra_search_dirs() -> list[Path]:
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources
    except (ImportError, ValueError, AttributeError):
        return []
    return [Path(s.path) for s in sources if s.schema == "file" and s.path]


def available_strategies() -> list[str]:
    return sorted(strategy_configs())


def load_strategy_config(name: str) -> dict:
    """The config of a strategy option, as Hydra would compose `strategy=<name>`."""
    from omegaconf import OmegaConf

    configs = strategy_configs()
    if name not in configs:
        raise ConfigError(f"strategy={name!r} is not a strategy config; choose one of: "
                          f"{', '.join(sorted(configs))}")
    return OmegaConf.to_container(OmegaConf.load(configs[name]), resolve=True)


def strategy_class(strategy_cfg: dict) -> type[Strategy]:
    """The class a strategy config's `_target_` names (a Strategy subclass)."""
    target = strategy_cfg.get("_target_")
    if not target or not isinstance(target, str):
        raise ConfigError(f"strategy._target_ is not set; a strategy config names its class: "
                          f"_target_: <module>.<Class> (strategy "
                          f"{show(strategy_cfg.get('name'))})")
    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"strategy._target_={target!r} cannot be imported ({e}); give "
                          "<module>.<Class> of a module on PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy._target_={target!r} is not a subclass of "
                          "flexkd.strategies.base.Strategy")
    return cls


def knobs_of(strategy_cfg: dict) -> dict:
    return {k: v for k, v in strategy_cfg.items() if k not in NOT_KNOBS}


def build_strategy(strategy_cfg: dict | str, **overrides) -> Strategy:
    """A strategy from its config (`_target_`, `name`, knobs), or from a strategy option's name
    (its YAML) with `overrides` on top."""
    if isinstance(strategy_cfg, str):
        strategy_cfg = load_strategy_config(strategy_cfg)
    strategy_cfg = {**strategy_cfg, **overrides}
    return strategy_class(strategy_cfg)(name=strategy_cfg.get("name"), **knobs_of(strategy_cfg))


def variant_of(strategy_cfg: dict) -> dict:
    """The strategy's name and the knobs that differ from its class defaults, with a label:
    `flexkd[beta=0.1,score=random]`, or `flexkd` alone when every knob is at its default."""
    cls = strategy_class(strategy_cfg)
    name = str(strategy_cfg.get("name") or cls.name)
    chosen = validate(cls.Knobs, knobs_of(strategy_cfg), prefix="strategy").model_dump(mode="json")
    defaults = cls.Knobs().model_dump(mode="json")
    settings = {k: chosen[k] for k in sorted(chosen) if chosen[k] != defaults[k]}
    label = name + (f"[{','.join(f'{k}={_compact(v)}' for k, v in settings.items())}]"
                    if settings else "")
    return {"strategy": name, "settings": settings, "label": label}


def _compact(value) -> str:
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)
