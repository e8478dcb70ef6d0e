"""Validate a composed run config before any heavy work (model loads, fine-tunes, probes).

`validate_config(cfg, resolve)` is the first thing a run does. It raises `ConfigError` whose
message starts with the offending key path (`strategy.temperature=0 ...`) and ends with a
hint (the valid choices, keys or range). Three layers of checks:

1. Schemas: every config group has a dataclass below (`DataSchema`, `StrategySchema`, ...).
   Unknown keys (typos that came in via `+key=...` or a user's own yaml), wrong types and
   impossible values are rejected. Field metadata carries the constraints (`ge`, `gt`, `le`,
   `choices`) and a short description used in the hint.
2. Task checks: the data folder exists and holds train/validation/test .jsonl, the
   classification label set, the main metric.
3. Pair checks that need model *configs* only, never weights: widths, depths and
   vocabularies are read from a spec's `init` dict or its `path`'s config.json, and the
   strategy is checked against them (raw needs equal widths, layer indices in range, k <=
   the student width, logit KD needs one vocabulary).

The late checks in the strategies, models and data module stay in place (defence in depth);
these fire first. A key added to the shipped conf/config.yaml is accepted at the top level
without a schema; a new group key needs a field in its schema here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flexkd.data.tasks import FORMATS, SPLITS, read_meta
from flexkd.errors import ConfigError, DataFileError, UserError
from flexkd.importance import SCORES, SELECTIONS, TARGETS
from flexkd.loggers import check_logger_config, resolve_mode
from flexkd.strategies import STRATEGIES
from flexkd.strategies.base import DIVERGENCES
from flexkd.strategies.flexkd import FEATURE_LOSSES

__all__ = ["validate_config", "check_schema", "ModelInfo", "model_info", "CLASSIFIER_METRICS"]

# What a classifier reports (`evaluate_model`); `task.main_metric` of a classification task
# must be one of these. Causal LMs report loss/perplexity and, with lm-eval, more (rouge1,
# acc, ...), so an instruction task's main metric is only checked not to be one of these.
CLASSIFIER_METRICS = ("accuracy", "macro_f1", "mcc")
DTYPES = ("float32", "bfloat16", "float16", "float64")
# Sizes in a random-init spec that must be positive integers.
INIT_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "max_position_embeddings")
RESUME_MODES = ("auto", "never")  # flexkd.jobs / pipeline: resume=auto | never
REDUCTIONS = ("mean", "sum")
MIN_MAX_LENGTH = 8
# Trainer arguments that flexkd sets itself (make_trainer passes them).
RESERVED_TRAINER_KEYS = {"logger": "choose the logger with logger=csv or logger=wandb",
                         "callbacks": "flexkd adds its own callbacks",
                         "default_root_dir": "it is the run's output dir (hydra.run.dir)"}
CONFIG_YAML = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


def spec(default: Any = None, *, doc: str = "", ge: float | None = None, gt: float | None = None,
         le: float | None = None, choices: tuple | None = None, required: bool = False,
         factory=None):
    """A schema field: its default, a description for hints, and its constraints."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "choices": choices, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- schemas

@dataclass
class DataSchema:
    batch_size: int = spec(16, ge=1, doc="training batch size")
    eval_batch_size: int = spec(64, ge=1, doc="evaluation batch size")
    num_workers: int = spec(0, ge=0, doc="DataLoader worker processes")


@dataclass
class OptimSchema:
    lr: float = spec(5e-4, gt=0, doc="the student's learning rate")
    weight_decay: float = spec(0.01, ge=0, doc="AdamW weight decay")
    warmup_ratio: float = spec(0.1, ge=0, le=1, doc="share of steps spent in linear warmup")
    trainable_layers: int | None = spec(None, ge=0, doc="train only the top N student blocks "
                                        "(+ head); null trains the whole student")


@dataclass
class FinetuneSchema:
    enabled: bool = spec(True, doc="fine-tune the teacher on the task first")
    max_steps: int = spec(300, ge=1, doc="teacher fine-tune steps")
    batch_size: int = spec(32, ge=1, doc="teacher fine-tune batch size")
    lr: float = spec(1e-3, gt=0, doc="teacher fine-tune learning rate")
    weight_decay: float = spec(0.01, ge=0, doc="teacher fine-tune weight decay")
    warmup_ratio: float = spec(0.1, ge=0, le=1, doc="share of teacher fine-tune steps in warmup")
    trainable_layers: int | None = spec(None, ge=0, doc="train only the top N teacher blocks")
    seed: int = spec(0, doc="teacher fine-tune seed")


@dataclass
class ModelSpecSchema:
    name: str = spec(required=True, doc="a display name")
    path: str | None = spec(None, doc="a local dir, hub name or asset:<name>; null: random init")
    tokenizer: str | None = spec(None, doc="tokenizer source; null: the model's own")
    init: dict | None = spec(None, doc="transformers config kwargs for random init, with "
                             "model_type")
    init_seed: int = spec(0, doc="seed of the random init")
    keep_layers: list[int] | None = spec(None, doc="keep only these blocks of a `path` model")
    prune: dict | None = spec(None, doc="a student pruned from a pretrained model: {from: <source>, "
                              "hidden_size, num_heads, intermediate_size, keep_layers|num_layers, "
                              "rank_by} (flexkd.pruning)")
    dtype: str | None = spec(None, choices=DTYPES, doc="weights dtype; null: float32")


@dataclass
class PairSchema:
    name: str = spec(required=True, doc="the pair's name")
    teacher: ModelSpecSchema = spec(factory=ModelSpecSchema, required=True, doc="the teacher")
    student: ModelSpecSchema = spec(factory=ModelSpecSchema, required=True, doc="the student")
    classify_with: str = spec("head", choices=("head", "label_words"),
                              doc="classification tasks: a linear head on the pooled state, or "
                              "the causal LM scoring label words (lm-eval multiple choice)")


@dataclass
class TaskSchema:
    name: str = spec(required=True, doc="the task's name")
    format: str = spec(required=True, choices=FORMATS, doc="the task format")
    data_dir: str = spec(required=True, doc="folder with train/validation/test .jsonl: "
                         "a path, fixture:<name> or asset:<name>")
    label_names: list[str] | None = spec(None, doc="class names; null: from meta.json")
    max_length: int = spec(128, ge=MIN_MAX_LENGTH, doc="tokens per example; longer ones are "
                           "truncated")
    max_prompt_words: int | None = spec(None, ge=1, doc="instruction tasks: keep the first N "
                                        "words of each prompt (before max_length cuts tokens)")
    max_train_examples: int | None = spec(None, ge=1, doc="cap on training rows; null: all")
    max_validation_examples: int | None = spec(None, ge=1, doc="cap on validation rows")
    max_test_examples: int | None = spec(None, ge=1, doc="cap on test rows")
    main_metric: str = spec(required=True, doc="the student metric a sweep optimises")


@dataclass
class StrategySchema:
    """The fields every strategy shares (SPEC: L = alpha L_task + beta L_feat + gamma L_logit)."""

    name: str = spec(required=True, doc="the strategy")
    alpha: float = spec(1.0, ge=0, doc="the task-loss weight")
    beta: float = spec(0.0, ge=0, doc="the feature-loss weight")
    gamma: float = spec(0.0, ge=0, doc="the logit-KD weight")
    temperature: float = spec(2.0, gt=0, doc="the logit-KD softmax temperature T")
    divergence: str = spec("forward", choices=DIVERGENCES, doc="the logit-KD divergence")
    layer_pairs: list[list[int]] | None = spec(factory=lambda: [[-1, -1]],
                                        doc="[student_layer, teacher_layer] pairs")


@dataclass
class FlexKDSchema(StrategySchema):
    score: str = spec("grad", choices=SCORES, doc="the importance score of teacher dims")
    selection: str = spec("coordinates", choices=SELECTIONS, doc="what the probe keeps")
    target: str = spec("gold", choices=TARGETS, doc="the probe's target")
    k: int | None = spec(None, ge=1, doc="teacher dims to keep; null: the student width")
    feature_loss: str = spec("corr", choices=FEATURE_LOSSES, doc="the feature loss")
    lam: float = spec(5e-3, ge=0, doc="the off-diagonal weight of the corr loss")
    reduction: str = spec("mean", choices=REDUCTIONS, doc="how the feature loss is reduced")
    probe_examples: int = spec(1024, ge=2, doc="probe examples, split in two halves for stability")
    probe_batch_size: int = spec(16, ge=1, doc="probe batch size")


STRATEGY_SCHEMAS: dict[str, type] = {"flexkd": FlexKDSchema}


@dataclass
class CsvLoggerSchema:
    name: str = spec("csv", required=True, doc="the logger")


@dataclass
class WandbLoggerSchema(CsvLoggerSchema):
    project: str | None = spec("flexkd", doc="the W&B project")
    entity: str | None = spec(None, doc="the W&B entity")
    group: str | None = spec(None, doc="the W&B group")
    tags: list[str] | None = spec(factory=list, doc="extra W&B tags")
    mode: str | None = spec(None, doc="online | offline | disabled | shared")
    log_model: bool = spec(False, doc="upload the saved student as an artifact")
    save_dir: str | None = spec(None, doc="where W&B writes")
    job_type: str | None = spec("distill", doc="the W&B job type")


LOGGER_SCHEMAS: dict[str, type] = {"csv": CsvLoggerSchema, "wandb": WandbLoggerSchema}


@dataclass
class CheckpointSchema:
    every_n_steps: int = spec(50, ge=1, doc="optimizer steps between training checkpoints")


@dataclass
class RootSchema:
    seed: int = spec(0, doc="the run's seed")
    cache_dir: str | None = spec(None, doc="cache root; null: $FLEXKD_CACHE or ~/.cache/flexkd")
    output_dir: str | None = spec(None, doc="output dir override")
    debug: bool = spec(False, doc="show tracebacks for user errors")
    save_student: bool = spec(True, doc="save the distilled student")
    resume: str = spec("auto", choices=RESUME_MODES, doc="resume policy")
    data: DataSchema = spec(factory=DataSchema, required=True, doc="the data loaders")
    optim: OptimSchema = spec(factory=OptimSchema, required=True, doc="the student optimiser")
    checkpoint: CheckpointSchema = spec(factory=CheckpointSchema, doc="training checkpoints")
    teacher_finetune: FinetuneSchema = spec(factory=FinetuneSchema, required=True,
                                            doc="the teacher fine-tune")
    # Checked by their own functions (their schema depends on the chosen option).
    pair: Any = spec(required=True, doc="the teacher/student pair (pair=<name>)")
    task: Any = spec(required=True, doc="the task (task=<name>)")
    strategy: Any = spec(required=True, doc="the strategy (strategy=<name>)")
    trainer: Any = spec(required=True, doc="Lightning Trainer arguments (trainer=<name>)")
    logger: Any = spec(required=True, doc="the logger (logger=<name>)")


# ----------------------------------------------------------------------------- the checker

def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


@functools.cache
def _type_hints(schema: type) -> dict:
    return typing.get_type_hints(schema)


def _describe(tp) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in parts) + " (or null)"
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return "a list of " + _plural(inner)
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp) -> str:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return "lists of " + _plural(inner)
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, "values")


def _hint(meta: dict) -> str:
    parts = []
    if meta.get("doc"):
        parts.append(meta["doc"])
    if meta.get("choices"):
        parts.append(f"one of: {_choices(meta['choices'])}")
    bounds = [f"{op} {meta[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("le", "<="))
              if meta.get(k) is not None]
    if bounds:
        parts.append(" and ".join(bounds))
    return f" ({'; '.join(parts)})" if parts else ""


def _type_ok(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict or typing.get_origin(tp) is dict:
        return isinstance(value, dict)
    return True


def _check_value(path: str, value, tp, meta: dict) -> None:
    if isinstance(value, str) and value == "???":
        raise ConfigError(f"{path} is not set (???); set it, e.g. {path}=<value>{_hint(meta)}")
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return
        tp, origin = args[0], typing.get_origin(args[0])
    if value is None:
        raise ConfigError(f"{path} must not be null; expected {_describe(tp)}{_hint(meta)}")
    if dataclasses.is_dataclass(tp):
        check_section(path, value, tp)
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={_show(value)} is not a list; expected {_describe(tp)}"
                              f"{_hint(meta)}")
        (inner,) = typing.get_args(tp) or (Any,)
        for i, item in enumerate(value):
            _check_value(_join(path, i), item, inner, {"doc": meta.get("doc")})
        return
    if not _type_ok(value, tp):
        raise ConfigError(f"{path}={_show(value)} is not {_describe(tp)}{_hint(meta)}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{path}={value} is not a finite number{_hint(meta)}")
    choices = meta.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}={_show(value)} is not a valid choice{maybe}; choose one of: "
                          f"{_choices(choices)}")
    for key, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                          ("le", lambda v, b: v <= b, "<=")):
        bound = meta.get(key)
        if bound is not None and isinstance(value, int | float) and not ok(value, bound):
            raise ConfigError(f"{path}={_show(value)} is out of range: it must be {word} {bound}"
                              f"{_hint({**meta, 'ge': None, 'gt': None, 'le': None})}")


def unknown_key_error(path: str, key: str, valid, what: str, list_all: bool = True) -> ConfigError:
    """`list_all=False`: name the valid keys only when no close match exists (long lists)."""
    full = _join(path, key)
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
    maybe = f"did you mean {_join(path, close[0])}?" if close else ""
    if close and not list_all:
        return ConfigError(f"{full} is not a key of {what}; {maybe}")
    return ConfigError(f"{full} is not a key of {what}; {maybe + ' ' if maybe else ''}valid keys: "
                       f"{_choices(sorted(valid))}")


def check_section(path: str, value, schema: type, extra_keys=(), what: str | None = None,
                  skip=()) -> None:
    """Check one mapping against a schema dataclass: unknown keys, missing required keys,
    types and constraints. `extra_keys` are accepted without checks; `skip` are not checked."""
    what = what or (path or "the config")
    if not isinstance(value, dict):
        raise ConfigError(f"{path}={_show(value)} is not a mapping; expected the keys of {what}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    allowed = set(fields) | set(extra_keys)
    for key in value:
        if key not in allowed:
            raise unknown_key_error(path, key, allowed - {"hydra"}, what)
    hints = _type_hints(schema)
    for name, f in fields.items():
        if name in skip:
            continue
        if name not in value:
            if f.metadata.get("required"):
                raise ConfigError(f"{_join(path, name)} is missing{_hint(f.metadata)}")
            continue
        _check_value(_join(path, name), value[name], hints[name], dict(f.metadata))


# ----------------------------------------------------------------------------- groups

def _root_extra_keys() -> set[str]:
    """Top-level keys the shipped config declares: conf/config.yaml's own keys and its config
    groups (the defaults list, conf/<group>/). They are accepted without a schema here."""
    keys: set[str] = {p.name for p in CONFIG_YAML.parent.iterdir() if p.is_dir()} \
        if CONFIG_YAML.parent.is_dir() else set()
    try:
        shipped = OmegaConf.to_container(OmegaConf.load(CONFIG_YAML))
    except (OSError, OmegaConfBaseException, ValueError):
        return keys
    for entry in shipped.get("defaults") or []:
        for group in (entry if isinstance(entry, dict) else {}):
            keys.add(str(group).split()[-1].split("@")[0].lstrip("/"))
    return keys | {k for k in shipped if k not in ("defaults", "hydra")}


def strategy_params(cls: type) -> set[str]:
    """Keyword arguments a strategy class accepts, following **kwargs up its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    names.discard("self")
    return names


def check_strategy(s: dict) -> None:
    if not isinstance(s, dict):
        raise ConfigError(f"strategy={_show(s)} is not a mapping; choose one with strategy=<name>")
    name = s.get("name")
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), sorted(STRATEGIES), n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"strategy.name={_show(name)} is not a registered strategy{maybe}; "
                          f"choose one of: {_choices(sorted(STRATEGIES))} (e.g. strategy=flexkd)")
    schema = STRATEGY_SCHEMAS.get(name, StrategySchema)
    extra = strategy_params(STRATEGIES[name]) - {f.name for f in dataclasses.fields(schema)}
    check_section("strategy", s, schema, extra_keys=extra, what=f"strategy {name!r}")
    for i, pair in enumerate(s.get("layer_pairs") or []):
        if len(pair) != 2:
            raise ConfigError(f"strategy.layer_pairs[{i}]={pair} is not a [student_layer, "
                              "teacher_layer] pair, e.g. strategy.layer_pairs=[[-1,-1]]")


@functools.cache
def trainer_params() -> frozenset[str]:
    import lightning as L

    params = inspect.signature(L.Trainer.__init__).parameters
    return frozenset(n for n in params if n != "self")


def check_trainer(t: dict) -> None:
    if not isinstance(t, dict):
        raise ConfigError(f"trainer={_show(t)} is not a mapping of Lightning Trainer arguments")
    valid = trainer_params() - set(RESERVED_TRAINER_KEYS)
    for key in t:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} cannot be set: {RESERVED_TRAINER_KEYS[key]}")
        if key not in valid:
            raise unknown_key_error("trainer", key, valid, "the Lightning Trainer arguments",
                                    list_all=False)
    if "max_steps" in t:
        _check_value("trainer.max_steps", t["max_steps"], int,
                     {"ge": -1, "doc": "optimizer steps; -1: use max_epochs"})
    if t.get("max_epochs") is not None:
        _check_value("trainer.max_epochs", t["max_epochs"], int, {"ge": -1})


def check_logger(lg: dict) -> None:
    if not isinstance(lg, dict):
        raise ConfigError(f"logger={_show(lg)} is not a mapping; choose one with logger=csv|wandb")
    name = check_logger_config({"logger": lg})  # the message users already know
    check_section("logger", lg, LOGGER_SCHEMAS[name], what=f"logger {name!r}")
    if name == "wandb" and lg.get("mode") is not None:
        resolve_mode(lg["mode"], env={}, logged_in=False)  # its message names logger.mode


def check_schema(cfg: DictConfig | dict, root_extra: set[str] | None = None) -> dict:
    """The schema layer alone (no file or model-config access); returns the plain container."""
    plain = _container(cfg)
    extra = (_root_extra_keys() if root_extra is None else set(root_extra)) | {"hydra"}
    schema_fields = {f.name for f in dataclasses.fields(RootSchema)}
    check_section("", plain, RootSchema, extra_keys=extra - schema_fields, what="the config")
    check_task(plain["task"])
    check_strategy(plain["strategy"])
    check_section("pair", plain["pair"], PairSchema, what="a pair")
    for side in ("teacher", "student"):
        check_model_spec(f"pair.{side}", plain["pair"][side])
    check_trainer(plain["trainer"])
    check_logger(plain["logger"])
    ft = plain["teacher_finetune"]
    if ft.get("enabled", True):
        for key in ("max_steps", "batch_size", "lr"):
            if key not in ft:
                raise ConfigError(f"teacher_finetune.{key} is missing (needed when "
                                  "teacher_finetune.enabled=true; or use teacher_finetune=none)")
    return plain


def _container(cfg) -> dict:
    if isinstance(cfg, dict):
        return cfg
    out = {}
    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            out[key] = (OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
                        if OmegaConf.is_config(node) else node)
        except OmegaConfBaseException as e:
            where = getattr(e, "full_key", None) or key
            msg = str(getattr(e, "msg", None) or e).strip().splitlines()[0]
            raise ConfigError(f"{where}: {msg}") from None
    return out


def check_task(t: dict) -> None:
    check_section("task", t, TaskSchema, what="a task")
    metric = t["main_metric"]
    if t["format"] == "classification" and metric not in CLASSIFIER_METRICS:
        raise ConfigError(f"task.main_metric={_show(metric)} is not a metric of classification "
                          f"tasks; choose one of: {_choices(CLASSIFIER_METRICS)}")
    if t["format"] == "instruction" and metric in CLASSIFIER_METRICS:
        raise ConfigError(f"task.main_metric={_show(metric)} is a classifier metric; instruction "
                          "tasks report perplexity and loss (and, with lm-eval, rouge1, rouge2, "
                          "rougeL, ...)")


def check_model_spec(path: str, m: dict) -> None:
    if m.get("prune"):
        if m.get("path") or m.get("init") or m.get("keep_layers") is not None:
            raise ConfigError(f"{path}.prune builds the model from prune.from; drop {path}.path, "
                              f".init and .keep_layers (use prune.keep_layers)")
        if not (m.get("tokenizer") or m["prune"].get("from")):
            raise ConfigError(f"{path}.prune.from is not set (the model to prune)")
        return
    if not m.get("path") and not (m.get("init") or {}).get("model_type"):
        raise ConfigError(f"{path}: give {path}.path (a model folder, hub name or asset:<name>) "
                          f"or {path}.init.model_type (random init, e.g. bert or llama)")
    if not m.get("path") and not m.get("tokenizer"):
        raise ConfigError(f"{path}.tokenizer is not set; a randomly initialised model needs a "
                          "tokenizer (a path, hub name, fixture:<name> or asset:<name>)")
    if m.get("keep_layers") is not None and not m.get("path"):
        raise ConfigError(f"{path}.keep_layers applies to a pretrained model; set {path}.path "
                          f"or give {path}.init.num_hidden_layers instead")


# ----------------------------------------------------------------------------- sources

def _resolve(key: str, source: str, resolve) -> str:
    source = str(source)
    if source.startswith("asset:"):
        from flexkd.assets import ASSETS

        name = source.split(":", 1)[1]
        if name not in ASSETS:
            raise ConfigError(f"{key}={source!r} names no asset; valid assets: "
                              f"{_choices(sorted(ASSETS))}")
    try:
        return str(resolve(source))
    except UserError as e:
        raise ConfigError(f"{key}={source!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any failure to find a source is reported at its key
        raise ConfigError(f"{key}={source!r} cannot be resolved: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- task checks

def check_task_files(t: dict, resolve) -> list[str]:
    """The data folder and its label set; returns the label names (classification)."""
    source = str(t["data_dir"])
    if not source.startswith("asset:"):  # assets are materialised (and checked) by the run
        data_dir = Path(_resolve("task.data_dir", source, resolve)).expanduser().resolve()
        if not data_dir.is_dir():
            raise ConfigError(f"task.data_dir={source!r}: folder not found: {data_dir} (it must "
                              f"hold {', '.join(f'{s}.jsonl' for s in SPLITS)})")
        for split in SPLITS:
            path = data_dir / f"{split}.jsonl"
            if not path.is_file():
                raise ConfigError(f"task.data_dir={source!r}: data file not found: {path} (a "
                                  f"task folder holds {', '.join(f'{s}.jsonl' for s in SPLITS)})")
        meta_path = data_dir / "meta.json"
        try:
            meta = read_meta(meta_path)
        except DataFileError as e:
            raise ConfigError(f"task.data_dir={source!r}: {e}") from None
        labels = list(t.get("label_names") or meta.get("label_names") or [])
        if t["format"] == "classification" and len(labels) < 2:
            raise ConfigError(f"task.label_names: a classification task needs at least 2 label "
                              f"names, in the task config (task.label_names=[neg,pos]) or in "
                              f"{meta_path}")
        return labels
    return list(t.get("label_names") or [])


# ----------------------------------------------------------------------------- pair checks

@dataclass
class ModelInfo:
    """What the pair checks need of one model, read from its config only."""

    role: str                 # "teacher" / "student"
    name: str
    width: int | None
    depth: int | None
    vocab: int | None          # the LM head's rows, when the config fixes them
    tokenizer: str | None      # its tokenizer source


def model_info(role: str, m: dict, resolve) -> ModelInfo:
    from transformers import AutoConfig

    key = f"pair.{role}"
    if m.get("prune"):
        from flexkd.pruning import pruned_shape

        try:
            config, width, depth = pruned_shape(
                m["prune"], lambda src: _resolve(f"{key}.prune.from", src, resolve))
        except (OSError, ValueError) as e:
            if str(e).startswith(key):
                raise
            raise ConfigError(f"{key}.{_first_line(e)}") from None
        return ModelInfo(role, str(m.get("name")), width, depth, getattr(config, "vocab_size", None),
                         m.get("tokenizer") or m["prune"].get("from"))
    if m.get("path"):
        local = _resolve(f"{key}.path", m["path"], resolve)
        try:
            config = AutoConfig.from_pretrained(local)
        except (OSError, ValueError, KeyError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(local).exists()
            hint = ("; a hub name needs the Hugging Face Hub: set HF_HUB_OFFLINE=0 where it "
                    "is reachable, or use a local directory or asset:<name>" if offline else "")
            raise ConfigError(f"{key}.path={m['path']!r}: cannot read its model config "
                              f"({_first_line(e)}){hint}") from None
        depth = getattr(config, "num_hidden_layers", None)
        keep = m.get("keep_layers")
        if keep is not None and depth is not None:
            bad = [i for i in keep if not 0 <= i < depth]
            if bad or not keep or sorted(set(keep)) != list(keep):
                raise ConfigError(f"{key}.keep_layers={list(keep)} must be increasing block "
                                  f"indices in 0..{depth - 1} ({m['path']} has {depth} blocks)")
            depth = len(keep)
        vocab = getattr(config, "vocab_size", None)
    else:
        init = dict(m.get("init") or {})
        model_type = init.pop("model_type")
        for size_key in INIT_SIZES:
            if size_key in init:
                _check_value(f"{key}.init.{size_key}", init[size_key], int, {"ge": 1})
        try:
            config = AutoConfig.for_model(model_type, **init)
        except (ValueError, KeyError, TypeError) as e:
            from transformers import CONFIG_MAPPING

            if model_type not in CONFIG_MAPPING:
                close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
                maybe = f"; did you mean {', '.join(close)}?" if close else " (e.g. bert, llama)"
                raise ConfigError(f"{key}.init.model_type={model_type!r} is not a transformers "
                                  f"model type{maybe}") from None
            raise ConfigError(f"{key}.init: {_first_line(e)}") from None
        heads = getattr(config, "num_attention_heads", None)
        width = getattr(config, "hidden_size", None)
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            raise ConfigError(f"{key}.init.hidden_size={width} is not a multiple of "
                              f"num_attention_heads={heads}")
        depth = getattr(config, "num_hidden_layers", None)
        vocab = init.get("vocab_size")  # else len(tokenizer), see models._backbone
    width = getattr(config, "hidden_size", None)
    return ModelInfo(role, str(m.get("name")), width if isinstance(width, int) else None,
                     depth if isinstance(depth, int) else None, vocab,
                     m.get("tokenizer") or m.get("path"))


def _layer_ok(layer: int, n: int) -> bool:
    return -(n + 1) <= layer <= n


def check_layers(s: dict, student: ModelInfo, teacher: ModelInfo) -> None:
    for i, (s_layer, t_layer) in enumerate(s.get("layer_pairs") or []):
        for j, layer, info in ((0, s_layer, student), (1, t_layer, teacher)):
            n = info.depth
            if n is not None and not _layer_ok(layer, n):
                raise ConfigError(
                    f"strategy.layer_pairs[{i}][{j}]={layer} is out of range for the {info.role} "
                    f"{info.name} with {n} layers (valid: 0..{n} or -{n + 1}..-1; 0 is the "
                    "embedding output, -1 the last layer)")


def _tokenizer(role: str, m: dict, resolve):
    from flexkd.models import load_tokenizer

    key = f"pair.{role}.{'tokenizer' if m.get('tokenizer') else 'path'}"
    source = m.get("tokenizer") or m.get("path")
    local = _resolve(key, source, resolve)
    try:
        return load_tokenizer({**m, "tokenizer": local}, lambda s: s)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}={source!r}: cannot load the tokenizer ({_first_line(e)})") from None


def check_logit_vocab(s: dict, pair: dict, student: ModelInfo, teacher: ModelInfo, resolve) -> None:
    """Causal logit KD compares next-token distributions: one vocabulary on both sides."""
    same_source = student.tokenizer == teacher.tokenizer  # as the run decides sharing
    toks: dict = {}

    def tokenizer(role: str):
        if role not in toks:
            toks[role] = (toks["student"] if same_source and "student" in toks
                          else _tokenizer(role, pair[role], resolve))
        return toks[role]

    sizes = {i.role: i.vocab if i.vocab is not None else len(tokenizer(i.role))
             for i in (student, teacher)}
    hint = ("use a pair with one tokenizer, or strategy.gamma=0 (feature strategies: flexkd, "
            "projection, cka)")
    if sizes["teacher"] != sizes["student"]:
        raise ConfigError(
            f"strategy.gamma={s['gamma']}: logit KD needs one vocabulary, but the teacher "
            f"{teacher.name} has {sizes['teacher']} output tokens (tokenizer {teacher.tokenizer}) "
            f"and the student {student.name} has {sizes['student']} (tokenizer {student.tokenizer}); "
            + hint)
    if not same_source and tokenizer("teacher").get_vocab() != tokenizer("student").get_vocab():
        raise ConfigError(
            f"strategy.gamma={s['gamma']}: logit KD needs one vocabulary, but the tokenizers "
            f"{teacher.tokenizer} (teacher) and {student.tokenizer} (student) map tokens "
            f"differently; " + hint)


def check_pair(plain: dict, resolve) -> None:
    pair, s = plain["pair"], plain["strategy"]
    student = model_info("student", pair["student"], resolve)
    teacher = model_info("teacher", pair["teacher"], resolve)
    name = s["name"]
    if name == "raw" and None not in (student.width, teacher.width) \
            and student.width != teacher.width:
        raise ConfigError(
            f"strategy=raw needs equal widths, but the student has d_S={student.width} and the "
            f"teacher d_T={teacher.width} (pair {pair['name']}); use strategy=projection (learned "
            "Linear d_S->d_T) or strategy=flexkd (parameter-free selection of d_S teacher dims).")
    check_layers(s, student, teacher)
    k = s.get("k")
    if k is not None and student.width is not None and k > student.width:
        raise ConfigError(f"strategy.k={k} exceeds the student width d_S={student.width} "
                          f"(pair {pair['name']}); use k <= {student.width}, or k=null for the "
                          "student width")
    for key, value, info in (("optim.trainable_layers", plain["optim"].get("trainable_layers"),
                              student),
                             ("teacher_finetune.trainable_layers",
                              plain["teacher_finetune"].get("trainable_layers")
                              if plain["teacher_finetune"].get("enabled", True) else None,
                              teacher)):
        if value is not None and info.depth is not None and value > info.depth:
            raise ConfigError(f"{key}={value} exceeds the {info.role} {info.name}'s "
                              f"{info.depth} blocks; use 0..{info.depth} (or null: all layers)")
    if s.get("gamma", 0) > 0 and plain["task"]["format"] == "instruction":
        check_logit_vocab(s, pair, student, teacher, resolve)


# ----------------------------------------------------------------------------- entry point

def validate_config(cfg: DictConfig, resolve=lambda s: s) -> None:
    """Raise ConfigError (key path + hint) for a config that cannot run; else return None.

    `resolve` maps a source (`fixture:`, `asset:`, a path) to a local path; it is called for
    task data (not for `asset:` data, which the run materialises) and for model `path`s and
    tokenizers whose config or vocabulary a check needs.
    """
    plain = check_schema(cfg)
    check_task_files(plain["task"], resolve)
    check_pair(plain, resolve)
