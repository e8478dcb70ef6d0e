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

import dataclasses
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, Strict
from torch import nn

from flexkd import losses
from flexkd.data.alignment import aligned_logit_rows, aligned_rows
from flexkd.errors import ConfigError
from flexkd.model_info import ModelInfo
from flexkd.models import ModelOutputs, TaskModel, response_positions
from flexkd.schema import STRICT, show, validate

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, eq=False)
class OutputRequest:
    """What a strategy reads of the teacher's outputs (a store keeps more: `stored_request`)."""

    layers: tuple[int, ...] = ()
    logits: bool = False
    # Top-k logit KD: the teacher's k most likely ids per KD row with their log-probabilities at
    # `topk_temperature` and the leftover mass (`losses.TeacherTopK`) suffice; None: full logits.
    topk: int | None = None
    topk_temperature: float | None = None
    # Per layer, what the strategy reads of the state: None (all of it), a 1-D LongTensor of
    # dims, or a (d, k) projection. The teacher-output store keeps full states instead.
    views: tuple = ()

    def apply(self, outputs: ModelOutputs) -> ModelOutputs:
        """`outputs` with each requested layer reduced to its view."""
        if outputs is None or outputs.reduced or not any(v is not None for v in self.views):
            return outputs
        hidden = dict(outputs.hidden)
        for layer, view in zip(self.layers, self.views, strict=True):
            if view is not None:
                h = outputs.hidden[layer]
                hidden[layer] = h[..., view] if view.dim() == 1 else h.float() @ view
        return dataclasses.replace(outputs, hidden=hidden, reduced=True)


class Strategy(nn.Module):
    """Plain fine-tuning with default knobs (alpha=1, beta=0, gamma=0); gamma > 0 adds logit KD."""

    name: ClassVar[str] = "base"  # a display name; a config's `name` replaces it

    class Knobs(BaseModel):
        model_config = STRICT

        alpha: TaskWeight = 1.0
        beta: FeatureWeight = 0.0
        gamma: LogitWeight = 0.0
        temperature: float = Field(2.0, gt=0, description="the logit-KD softmax temperature T")
        divergence: Literal[losses.DIVERGENCES] = Field("forward", description="the logit-KD divergence")
        skew: float = Field(0.1, ge=0, le=1, description="the mixing weight of the skl / srkl "
                            "divergences (DistiLLM); 0 gives forward / reverse KL")
        logit_topk: int | None = Field(None, ge=1, description="logit KD against the teacher's top-k "
                                       "ids plus one leftover bucket; null: the full distribution")
        logit_chunk_rows: int | None = Field(
            None, ge=1, description="compute logit KD in chunks of this many rows (causal LMs: from "
            "the LM head's input, so no extra (N, V) logits); null: in one piece")
        layer_pairs: list[LayerPair] = Field(
            [(-1, -1)], min_length=1,
            description="[student_layer, teacher_layer] pairs; 0 = embeddings, -1 = last layer")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Knobs become attributes: one named like a method or module state would replace it.
        taken = set(dir(Strategy)) | {"training", "knobs", "resolved_pairs", "chunk_from_heads"}
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
        check_logit_knobs(self.knobs)
        # Chunked logit KD from (hidden rows, head weight) once setup has found both models' heads
        # to be plain linear maps; until then (or if not) it chunks the logits themselves.
        self.chunk_from_heads = False

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
        topk = self.logit_topk if self.gamma > 0 else None
        return OutputRequest(layers=layers, logits=self.gamma > 0, topk=topk,
                             topk_temperature=self.temperature if topk else None)

    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.resolved_pairs) if self.feature_term_active else ()

    @property
    def needs_teacher(self) -> bool:
        request = self.teacher_request()
        return bool(request.layers) or request.logits

    def needs_teacher_for_config(self) -> bool:
        return self.uses_features or self.gamma > 0

    @property
    def compares_tokens(self) -> bool:
        """Whether the losses compare teacher and student token by token (a feature term, or ULD
        on aligned positions). Such a strategy needs two tokenizations aligned, which pre-flight
        validation checks on a data sample; others (sft) run on any pair."""
        return self.feature_term_active or (self.gamma > 0 and self.divergence == "uld")

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
        if self.gamma > 0 and self.divergence == "uld":
            check_one_output_kind(self.gamma, student, teacher)  # any two vocabularies
        elif self.gamma > 0:
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
        if self.gamma > 0 and self.logit_chunk_rows is not None:
            self.chunk_from_heads = heads_are_linear(ctx.student, ctx.teacher)
        outputs = ctx.teacher.num_outputs
        if self.gamma > 0 and self.logit_topk is not None and self.logit_topk > outputs:
            raise ConfigError(f"strategy.logit_topk={self.logit_topk} exceeds the teacher's {outputs} "
                              f"outputs ({ctx.teacher.kind}); use logit_topk <= {outputs}, or null")

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
            # ULD across two tokenizers compares aligned positions, not the KD rows.
            terms["logit"] = self.gamma * (
                losses.logit_divergence(*logit_rows(batch, teacher, student), self.temperature, "uld")
                if self.divergence == "uld" and "alignment" in batch
                else self.logit_loss(teacher, student))
        if self.feature_term_active:
            for name, value in self.feature_losses(batch, teacher, student).items():
                terms[name] = self.beta * value
        return terms

    # Whether the feature term is a mean over token rows (MSE, cosine): it is then normalised by
    # the rows of the whole optimizer step. Batch statistics (correlation, CKA) are not.
    feature_is_row_mean: ClassVar[bool] = False

    def additive_terms(self) -> frozenset[str]:
        """The terms that are means over rows (tokens or examples), so a step's loss can be their
        sum over all its rows over the row count (flexkd.data.step_units). The others are computed
        per micro-batch: their gradient depends on how a step's batch is split."""
        return frozenset({"task", "logit"} | ({"feature"} if self.feature_is_row_mean else set()))

    def logit_loss(self, teacher: ModelOutputs, student: ModelOutputs) -> torch.Tensor:
        """The unweighted logit-KD term over the KD rows (`ModelOutputs.kd_logits`): dense, against
        the teacher's top-k (`logit_topk`), or in row chunks (`logit_chunk_rows`)."""
        t, kind, skew = self.temperature, self.divergence, self.skew
        if self.logit_topk is not None:
            top = teacher_topk_of(teacher, self.logit_topk, t)
            return losses.topk_logit_divergence(student.kd_logits, top.logprobs, top.ids, t, kind, skew,
                                                teacher_rest_logprob=top.rest_logprob)
        if self.logit_chunk_rows is not None:
            s_rows, s_head = kd_rows(student, self.chunk_from_heads)
            t_rows, t_head = kd_rows(teacher, self.chunk_from_heads)
            # The frozen teacher's head is a parameter: no gradient may reach it from here.
            t_head = None if t_head is None else t_head.detach()
            return losses.chunked_logit_divergence(s_rows, t_rows, t, kind, skew, student_head=s_head,
                                                   teacher_head=t_head, chunk_rows=self.logit_chunk_rows)
        return losses.logit_divergence(student.kd_logits, teacher.kd_logits, t, kind, skew)

    def extra_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def diagnostics(self) -> dict:
        return {}


def check_logit_knobs(knobs) -> None:
    """Knob combinations the logit term cannot run (each knob alone is valid)."""
    if knobs.logit_topk is not None and knobs.logit_chunk_rows is not None:
        raise ConfigError(f"strategy.logit_topk={knobs.logit_topk} and strategy.logit_chunk_rows="
                          f"{knobs.logit_chunk_rows}: choose one (set the other to null)")
    for key in ("logit_topk", "logit_chunk_rows"):
        if getattr(knobs, key) is not None and knobs.divergence not in losses.SHARED_VOCAB_DIVERGENCES:
            raise ConfigError(
                f"strategy.{key}={getattr(knobs, key)} needs a one-vocabulary divergence, but "
                f"strategy.divergence={knobs.divergence!r}; choose one of "
                f"{', '.join(losses.SHARED_VOCAB_DIVERGENCES)}, or set strategy.{key}=null")


def teacher_topk_of(teacher: ModelOutputs, k: int, temperature: float) -> losses.TeacherTopK:
    """The teacher's top-k at `temperature`: precomputed (a store's `kd_topk`) or from its logits."""
    if teacher.kd_topk is None:
        return losses.teacher_topk(teacher.kd_logits, k, temperature)
    stored = teacher.kd_topk.ids.shape[-1]
    if stored != k:
        raise ValueError(f"the teacher's precomputed top-k has k={stored}, the strategy asks for k={k}")
    return teacher.kd_topk


def kd_rows(outputs: ModelOutputs, from_head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, head) for chunked logit KD: the LM head's input rows and weight when allowed and
    present, else the KD logits themselves (head None)."""
    if from_head and outputs.kd_hidden is not None and outputs.kd_head is not None:
        return outputs.kd_hidden, outputs.kd_head
    if outputs.kd_logits is None:
        raise ValueError("chunked logit KD needs KD logits, or hidden rows and an LM head; these "
                         "outputs have neither (a store that keeps only a top-k?)")
    return outputs.kd_logits, None


def heads_are_linear(student: TaskModel, teacher: TaskModel) -> bool:
    """Whether both causal LMs' logits are their last hidden state times the head weight, so
    chunked logit KD may start from the hidden rows; if not, say why and chunk the logits."""
    problems = [f"the {role} {problem}" for role, model in (("student", student), ("teacher", teacher))
                if (problem := getattr(model, "linear_head_problem", lambda: "has no LM head")())]
    if problems:
        log.warning("strategy.logit_chunk_rows: chunking the logits, not the LM head's input, "
                    "because %s", "; ".join(problems))
    return not problems


def paired_tokens(batch, teacher: ModelOutputs, student: ModelOutputs, pair):
    """(M, d_S), (M, d_T) rows of one (student_layer, teacher_layer) pair that describe the same
    text: the valid tokens one-to-one with one tokenizer; with two, one row per aligned group,
    pooled as the batch's alignment says (`alignment.pool`; see flexkd.data.alignment)."""
    s_layer, t_layer = pair
    return aligned_rows(batch, student.hidden[s_layer], teacher.hidden[t_layer])


def logit_rows(batch, teacher: ModelOutputs, student: ModelOutputs):
    """The (N, V_S), (N, V_T) logit rows ULD compares. Causal LMs with two tokenizers: the
    next-token logits at the last token of each aligned group (both sides have then read the
    same characters), where both predict a target token. Otherwise the KD rows (class logits,
    or one tokenizer's response positions)."""
    if "alignment" not in batch or student.logits.dim() != 3:
        return student.kd_logits, teacher.kd_logits
    return aligned_logit_rows(batch, student.logits, teacher.logits,
                              response_positions(batch["student"]["labels"]),
                              response_positions(batch["teacher"]["labels"]))


def check_one_output_kind(gamma: float, student: ModelInfo, teacher: ModelInfo) -> None:
    if student.kind != teacher.kind:
        raise ConfigError(f"strategy.gamma={gamma}: logit KD needs one output space, but the "
                          f"teacher is a {teacher.kind} and the student a {student.kind}; use "
                          "a pair of the same kind, or strategy.gamma=0 (no logit term)")


def check_one_vocabulary(gamma: float, student: ModelInfo, teacher: ModelInfo) -> None:
    """Logit KD compares distributions over one output space: class logits of one label set
    always do; token logits need one vocabulary (same size, same token -> id map)."""
    hint = ("use a pair with one tokenizer, strategy.divergence=uld (a cross-vocabulary "
            "baseline), or strategy.gamma=0 (no logit term)")
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
