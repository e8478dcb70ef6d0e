"""Validate a composed run config before any heavy work (model loads, fine-tunes, probes).

`validate_config(cfg, resolve)` is the first thing a run does. It raises `ConfigError` whose
message starts with the offending key path (`strategy.temperature=0 ...`) and ends with a
hint (the valid choices, keys or range). Three layers of checks:

1. Schemas: every config group is a pydantic model below (the strategy's is its class's
   `Knobs`). Unknown keys, wrong types and impossible values are rejected; `flexkd.schema`
   turns the first pydantic error into the one-line message.
2. Task and run checks: the data folder holds train/validation/test .jsonl and a label set,
   the main metric fits the format, the cache dir can be created.
3. Pair checks that need model *configs* only, never weights: widths, depths and
   vocabularies are read from a spec's `init` dict or its `path`'s config.json and handed to
   the strategy's own `check_pair` (the one `setup` calls again on the loaded models).
4. Pre-flight alignment: with two tokenizers and a strategy that compares tokens, the first
   `alignment.check_examples` training examples are aligned (flexkd.data.preflight).

A key added to the shipped conf/config.yaml is accepted at the top level without a schema;
a new group key needs a field in its model here.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from pathlib import Path
from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, Field

from flexkd.data.tasks import FORMATS, SPLITS, read_meta
from flexkd.errors import ConfigError, DataFileError, UserError
from flexkd.loggers import check_logger_config, resolve_mode
from flexkd.model_info import ModelInfo
from flexkd.schema import STRICT, first_line, show, unknown_key_error, validate
from flexkd.storage import default_cache_dir
from flexkd.strategies.base import available_strategies, build_strategy

__all__ = ["validate_config", "check_schema", "CLASSIFIER_METRICS"]

# What a classifier reports (`evaluate_model`); `task.main_metric` of a classification task
# must be one of these. Causal LMs report loss/perplexity and, with lm-eval, more (rouge1,
# acc, ...), so an instruction task's main metric is only checked not to be one of these.
CLASSIFIER_METRICS = ("accuracy", "macro_f1", "mcc")
MIN_MAX_LENGTH = 8
# Trainer arguments that flexkd sets itself (make_trainer passes them).
RESERVED_TRAINER_KEYS = {"logger": "choose the logger with logger=csv or logger=wandb",
                         "callbacks": "flexkd adds its own callbacks",
                         "default_root_dir": "it is the run's output dir (hydra.run.dir)"}
CONFIG_YAML = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


# ----------------------------------------------------------------------------- schemas

class Schema(BaseModel):
    model_config = STRICT


class Data(Schema):
    batch_size: int = Field(16, ge=1, description="training batch size")
    eval_batch_size: int = Field(64, ge=1, description="evaluation batch size")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    bucket_by_length: bool = Field(True, description="batch examples of similar length (less "
                                   "padding)")
    train_fraction: float = Field(1.0, gt=0, le=1, description="allowed range (0, 1]: the share of "
                                  "the training set the student is distilled on; 1.0: all of it")
    subset_seed: int = Field(0, ge=0, description="seed of the train_fraction subset (the same for "
                             "every strategy and run seed)")


class Optim(Schema):
    lr: float = Field(5e-4, gt=0, description="the student's learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of steps spent in linear warmup")
    trainable_layers: int | None = Field(None, ge=0, description="train only the top N student "
                                         "blocks (+ head); null trains the whole student")
    fused: bool = Field(True, description="AdamW's fused kernel where the device and trainer allow "
                        "it; false: the plain kernel (same update up to rounding)")


class Finetune(Schema):
    enabled: bool = Field(True, description="fine-tune the teacher on the task first")
    max_steps: int = Field(300, ge=-1, description="teacher fine-tune steps; -1: use max_epochs")
    max_epochs: int | None = Field(None, ge=1, description="teacher fine-tune epochs (null: "
                                   "max_steps only)")
    batch_size: int = Field(32, ge=1, description="teacher fine-tune batch size")
    lr: float = Field(1e-3, gt=0, description="teacher fine-tune learning rate")
    weight_decay: float = Field(0.01, ge=0, description="teacher fine-tune weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of teacher fine-tune steps "
                                "in warmup")
    trainable_layers: int | None = Field(None, ge=0, description="train only the top N teacher blocks")
    seed: int = Field(0, ge=0, description="teacher fine-tune seed")


class Heal(Schema):
    steps: int = Field(0, ge=0, description="steps of next-token loss on every token of the "
                       "training text (prompt and response) before distillation; 0: none")
    lr: float = Field(2e-4, gt=0, description="healing learning rate")
    weight_decay: float = Field(0.01, ge=0, description="healing AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of healing steps in warmup")
    seed: int = Field(0, ge=0, description="healing seed (the same for every run seed)")


class ModelSpec(Schema):
    name: str = Field(description="a display name")
    path: str | None = Field(None, description="a local dir, hub name or asset:<name>; null: "
                             "random init")
    tokenizer: str | None = Field(None, description="tokenizer source; null: the model's own")
    init: dict | None = Field(None, description="transformers config kwargs for random init, "
                              "with model_type")
    init_seed: int = Field(0, description="seed of the random init")
    keep_layers: list[int] | None = Field(None, description="keep only these blocks of a `path` model")
    prune: dict | None = Field(None, description="a student pruned from a pretrained model: {from: "
                               "<source>, hidden_size, num_heads, intermediate_size, "
                               "keep_layers|num_layers, rank_by, probe_layer, probe_score} "
                               "(flexkd.pruning)")
    heal: Heal | None = Field(None, description="students: a healing pass before distillation "
                              "(flexkd.healing; for pruned causal students)")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = Field(
        None, description="weights dtype; null: float32")
    attn_implementation: str | None = Field(
        None, description="transformers' attention kernel (eager, sdpa, flash_attention_2, ...); "
        "null: transformers' default")
    final_norm_state: Literal["post", "pre"] = Field(
        "post", description="what layer -1 is for a decoder: after its final norm (HF "
        "hidden_states[-1]) or before it")


class Pair(Schema):
    name: str = Field(description="the pair's name")
    teacher: ModelSpec = Field(description="the teacher")
    student: ModelSpec = Field(description="the student")
    classify_with: Literal["head", "label_words"] = Field(
        "head", description="classification tasks: a linear head on the pooled state, or the "
        "causal LM scoring label words (lm-eval multiple choice)")


class Task(Schema):
    name: str = Field(description="the task's name")
    format: Literal[FORMATS] = Field(description="the task format")
    data_dir: str = Field(description="folder with train/validation/test .jsonl: a path, "
                          "fixture:<name> or asset:<name>")
    label_names: list[str] | None = Field(None, description="class names; null: from meta.json")
    max_length: int = Field(128, ge=MIN_MAX_LENGTH, description="tokens per example; longer ones "
                            "are truncated")
    max_prompt_words: int | None = Field(None, ge=1, description="instruction tasks: keep the first "
                                         "N words of each prompt (before max_length cuts tokens)")
    prompt_template: Literal["plain", "chat"] = Field("plain", description="instruction tasks: "
                                                    "the prompt format (chat: the tokenizer's chat template)")
    max_new_tokens: int | None = Field(None, ge=1, description="instruction tasks: new tokens per "
                                       "generated answer (eval.max_gen_toks overrides)")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training rows; null: all")
    max_validation_examples: int | None = Field(None, ge=1, description="cap on validation rows")
    max_test_examples: int | None = Field(None, ge=1, description="cap on test rows")
    main_metric: str = Field(description="the student metric a sweep optimises")


class CsvLogger(Schema):
    name: str = Field(description="the logger")


class WandbLogger(CsvLogger):
    project: str | None = Field("flexkd", description="the W&B project")
    entity: str | None = Field(None, description="the W&B entity")
    group: str | None = Field(None, description="the W&B group")
    tags: list[str] | None = Field([], description="extra W&B tags")
    mode: str | None = Field(None, description="online | offline | disabled | shared")
    log_model: bool = Field(False, description="upload the saved student as an artifact")
    save_dir: str | None = Field(None, description="where W&B writes")
    job_type: str | None = Field("distill", description="the W&B job type")


LOGGERS: dict[str, type[Schema]] = {"csv": CsvLogger, "wandb": WandbLogger}


class TrainerLimits(Schema):
    model_config = {**STRICT, "extra": "ignore"}  # the other keys are Trainer arguments
    max_steps: int = Field(-1, ge=-1, description="optimizer steps; -1: use max_epochs")
    max_epochs: int | None = Field(None, ge=-1, description="epochs")


class Checkpoint(Schema):
    every_n_steps: int = Field(50, ge=1, description="optimizer steps between training checkpoints")
    keep_last: bool = Field(False, description="keep a finished job's resume checkpoint")


class Alignment(Schema):
    pool: Literal["auto", "mean", "last"] = Field(
        "auto", description="how an aligned group's tokens become one row: auto = last for "
        "causal LMs, mean for encoders")
    check_examples: int = Field(64, ge=1, description="training examples aligned in pre-flight")
    max_dropped_share: float = Field(0.1, ge=0, le=1, description="an example fails pre-flight "
                                     "when more of its characters are covered on one side only")


class Removal(Schema):
    grid: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="m values (0..d_T); null: 0 and d_T/64 .. d_T/2")
    random_draws: int = Field(3, ge=1, description="seeded random-m draws per m")
    fill: Literal["zero", "mean"] = Field("zero", description="what a removed dim becomes: zero, "
                                          "or its mean over the probe data")


def check_removal_stage(plain: dict, resolve) -> None:
    """stage=removal: a classification task, a Flex-KD strategy (its probe ranks the dims) and
    a grid within the teacher width (read from its config)."""
    if plain.get("stage") != "removal":
        return
    grid = (plain.get("removal") or {}).get("grid") or []
    if plain["task"]["format"] != "classification":
        raise ConfigError(f"stage=removal measures a classification teacher's accuracy; task "
                          f"{plain['task']['name']} is an {plain['task']['format']} task (choose a "
                          "classification task)")
    from flexkd.strategies.flexkd import FlexKD

    if not isinstance(build_strategy(plain["strategy"]), FlexKD):
        raise ConfigError(f"stage=removal ranks dims with the Flex-KD probe; strategy="
                          f"{plain['strategy'].get('name')} has none (use strategy=flexkd)")
    width = ModelInfo.from_spec("teacher", plain["pair"]["teacher"],
                                functools.partial(_resolve, resolve=resolve)).width
    if width is not None and (big := [m for m in grid if m > width]):
        raise ConfigError(f"removal.grid={grid}: {big[0]} exceeds the teacher width d_T={width}; use "
                          "values up to d_T, or removal.grid=null for the automatic grid")


class Root(Schema):
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the run's seed")
    cache_dir: str | None = Field(None, description="cache root; null: $FLEXKD_CACHE or "
                                  "~/.cache/flexkd")
    output_dir: str | None = Field(None, description="output dir override")
    debug: bool = Field(False, description="show tracebacks for user errors")
    save_student: bool = Field(True, description="save the distilled student")
    resume: Literal["auto", "never"] = Field("auto", description="resume policy")
    teacher_store: Literal["auto", "off"] = Field(
        "auto", description="auto: read the frozen teacher's outputs from a store built once")
    data: Data = Field(description="the data loaders")
    optim: Optim = Field(description="the student optimiser")
    checkpoint: Checkpoint = Field(Checkpoint(), description="training checkpoints")
    alignment: Alignment = Field(Alignment(), description="token alignment across tokenizers")
    teacher_finetune: Finetune = Field(description="the teacher fine-tune")
    # Checked by their own functions (their schema depends on the chosen option).
    pair: dict = Field(description="the teacher/student pair (pair=<name>)")
    task: dict = Field(description="the task (task=<name>)")
    strategy: dict = Field(description="the strategy (strategy=<name>)")
    trainer: dict = Field(description="Lightning Trainer arguments (trainer=<name>)")
    logger: dict = Field(description="the logger (logger=<name>)")


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


def _unset(path: str, value) -> str | None:
    """The first `???` (a mandatory value nobody set) below `value`, as a key path."""
    if isinstance(value, str) and value == "???":
        return path
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        found = _unset(f"{path}[{key}]" if isinstance(key, int) else
                       f"{path}.{key}" if path else str(key), sub)
        if found:
            return found
    return None


def check_strategy(s) -> None:
    """The strategy config names a strategy option, its `_target_` imports, its knobs validate."""
    if not isinstance(s, dict):
        raise ConfigError(f"strategy={show(s)} is not a mapping; choose one with strategy=<name>")
    names = available_strategies()
    if s.get("name") not in names:
        close = difflib.get_close_matches(str(s.get("name")), names, n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"strategy.name={show(s.get('name'))} is not a strategy config{maybe}; "
                          f"choose one of: {', '.join(names)} (conf/strategy/*.yaml on Hydra's "
                          "search path)")
    build_strategy(s)


@functools.cache
def trainer_params() -> frozenset[str]:
    import lightning as L

    params = inspect.signature(L.Trainer.__init__).parameters
    return frozenset(n for n in params if n != "self")


def check_trainer(t) -> None:
    if not isinstance(t, dict):
        raise ConfigError(f"trainer={show(t)} is not a mapping of Lightning Trainer arguments")
    valid = trainer_params() - set(RESERVED_TRAINER_KEYS)
    for key in t:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} cannot be set: {RESERVED_TRAINER_KEYS[key]}")
        if key not in valid:
            raise unknown_key_error("trainer", key, valid, "the Lightning Trainer arguments",
                                    list_all=False)
    validate(TrainerLimits, t, prefix="trainer")


def check_logger(lg) -> None:
    if not isinstance(lg, dict):
        raise ConfigError(f"logger={show(lg)} is not a mapping; choose one with logger=csv|wandb")
    name = check_logger_config({"logger": lg})  # the message users already know
    validate(LOGGERS[name], lg, prefix="logger", what=f"logger {name!r}")
    if name == "wandb" and lg.get("mode") is not None:
        resolve_mode(lg["mode"], env={}, logged_in=False)  # its message names logger.mode


def check_task(t: dict) -> None:
    validate(Task, t, prefix="task", what="a task")
    metric = t["main_metric"]
    if t["format"] == "classification" and metric not in CLASSIFIER_METRICS:
        raise ConfigError(f"task.main_metric={show(metric)} is not a metric of classification "
                          f"tasks; choose one of: {', '.join(CLASSIFIER_METRICS)}")
    if t["format"] == "instruction" and metric in CLASSIFIER_METRICS:
        raise ConfigError(f"task.main_metric={show(metric)} is a classifier metric; instruction "
                          "tasks report perplexity and loss (and, with lm-eval, rouge1, rouge2, "
                          "rougeL, ...)")


def check_model_spec(path: str, m: dict) -> None:
    if m.get("prune"):
        if m.get("path") or m.get("init") or m.get("keep_layers") is not None:
            raise ConfigError(f"{path}.prune builds the model from {path}.prune.from; drop "
                              f"{path}.path, .init and .keep_layers (use prune.keep_layers)")
        if not m["prune"].get("from"):
            raise ConfigError(f"{path}.prune.from is not set (the model to prune: a path, "
                              "asset:<name> or hub name)")
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


def check_probe_pruning(pair: dict) -> None:
    """`prune.rank_by: probe` (the default) ranks the source's dims by the teacher's probe, so
    the source must be the teacher's own model (same dims)."""
    from flexkd.importance import SCORES
    from flexkd.pruning import SPEC_RANKING

    prune = pair["student"].get("prune")
    if not prune or prune.get("rank_by", SPEC_RANKING) != "probe":
        return
    if prune.get("from") != pair["teacher"].get("path"):
        raise ConfigError(f"pair.student.prune.rank_by=probe ranks dims by the teacher's probe, so "
                          f"prune.from={show(prune.get('from'))} must be the teacher's path "
                          f"({show(pair['teacher'].get('path'))}); or set prune.rank_by=activation")
    if prune.get("probe_score", "grad") not in SCORES:
        raise ConfigError(f"pair.student.prune.probe_score={show(prune.get('probe_score'))} is not "
                          f"valid; choose one of: {', '.join(SCORES)}")
    if not isinstance(prune.get("probe_layer", -1), int):
        raise ConfigError(f"pair.student.prune.probe_layer={show(prune.get('probe_layer'))} must be "
                          "an integer teacher layer (-1: the last)")


def check_schema(cfg: DictConfig | dict, root_extra: set[str] | None = None) -> dict:
    """The schema layer alone (no file or model-config access); returns the plain container."""
    plain = _container(cfg)
    if where := _unset("", plain):
        raise ConfigError(f"{where} is not set (???); set it, e.g. {where}=<value>")
    extra = (_root_extra_keys() if root_extra is None else set(root_extra)) - set(Root.model_fields)
    validate(Root, {k: v for k, v in plain.items() if k not in extra | {"hydra"}},
             what="the config", extra_keys=extra)
    check_task(plain["task"])
    check_strategy(plain["strategy"])
    validate(Pair, plain["pair"], prefix="pair", what="a pair")
    for side in ("teacher", "student"):
        check_model_spec(f"pair.{side}", plain["pair"][side])
    check_probe_pruning(plain["pair"])
    check_trainer(plain["trainer"])
    check_logger(plain["logger"])
    validate(Removal, plain.get("removal") or {}, prefix="removal", what="the removal stage")
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


def check_cache_dir(cache_dir: str | None) -> None:
    """The cache root must be a folder this user can create and write (nothing is created)."""
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = f"cache_dir={show(cache_dir)}" if cache_dir else f"the default cache dir {target}"
    existing = target.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = (None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else
               f"{existing} is not a folder" if not existing.is_dir() else
               f"{existing} is not writable")
    if problem:
        raise ConfigError(f"{key} cannot be created: {problem}; set cache_dir to a writable "
                          "folder (or null: $FLEXKD_CACHE or ~/.cache/flexkd)")


# ----------------------------------------------------------------------------- sources

def _resolve(key: str, source: str, resolve) -> str:
    source = str(source)
    if source.startswith("asset:"):
        from flexkd.assets import ASSETS

        name = source.split(":", 1)[1]
        if name not in ASSETS:
            raise ConfigError(f"{key}={source!r} names no asset; valid assets: "
                              f"{', '.join(sorted(ASSETS))}")
    try:
        return str(resolve(source))
    except UserError as e:
        raise ConfigError(f"{key}={source!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any failure to find a source is reported at its key
        raise ConfigError(f"{key}={source!r} cannot be resolved: {first_line(e)}") from e


# ----------------------------------------------------------------------------- task checks

def check_task_files(t: dict, resolve) -> list[str]:
    """The data folder and its label set; returns the label names (classification)."""
    source = str(t["data_dir"])
    if source.startswith("asset:"):  # assets are materialised (and checked) by the run
        return list(t.get("label_names") or [])
    data_dir = Path(_resolve("task.data_dir", source, resolve)).expanduser().resolve()
    files = ", ".join(f"{s}.jsonl" for s in SPLITS)
    if not data_dir.is_dir():
        raise ConfigError(f"task.data_dir={source!r}: folder not found: {data_dir} (it must "
                          f"hold {files})")
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise ConfigError(f"task.data_dir={source!r}: data file not found: {path} (a "
                              f"task folder holds {files})")
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


# ----------------------------------------------------------------------------- pair checks

def check_pair(plain: dict, resolve) -> None:
    pair, task = plain["pair"], plain["task"]
    token_logits = task["format"] == "instruction" or pair.get("classify_with") == "label_words"
    kind = "causal_lm" if token_logits else "classifier"
    at = functools.partial(_resolve, resolve=resolve)
    student = ModelInfo.from_spec("student", pair["student"], at, kind)
    teacher = ModelInfo.from_spec("teacher", pair["teacher"], at, kind)
    if student.tokenizer == teacher.tokenizer:  # the run shares one tokenizer object
        teacher.load_tokenizer = student.load_tokenizer
    strategy = build_strategy(plain["strategy"])
    strategy.check_pair(student, teacher)
    ft = plain["teacher_finetune"]
    for key, value, info in (("optim.trainable_layers", plain["optim"].get("trainable_layers"),
                              student),
                             ("teacher_finetune.trainable_layers",
                              ft.get("trainable_layers") if ft.get("enabled", True) else None,
                              teacher)):
        if value is not None and info.depth is not None and value > info.depth:
            raise ConfigError(f"{key}={value} exceeds the {info.role} {info.name}'s "
                              f"{info.depth} blocks; use 0..{info.depth} (or null: all layers)")
    # Last: it reads data. Two tokenizers and a strategy comparing tokens: align a sample now,
    # before any teacher work, so a pair that cannot be aligned fails in seconds.
    if student.tokenizer != teacher.tokenizer and strategy.compares_tokens:
        from flexkd.data.preflight import check_pair_alignment

        a = plain.get("alignment") or {}
        check_pair_alignment(task, student.load_tokenizer(), teacher.load_tokenizer(), resolve,
                             label_words=pair.get("classify_with") == "label_words",
                             examples=a.get("check_examples", 64),
                             max_dropped_share=a.get("max_dropped_share", 0.1))


# ----------------------------------------------------------------------------- entry point

def validate_config(cfg: DictConfig, resolve=lambda s: s) -> None:
    """Raise ConfigError (key path + hint) for a config that cannot run; else return None.

    `resolve` maps a source (`fixture:`, `asset:`, a path) to a local path; it is called for
    task data (not for `asset:` data, which the run materialises) and for model `path`s and
    tokenizers whose config or vocabulary a check needs.
    """
    plain = check_schema(cfg)
    check_cache_dir(plain.get("cache_dir"))
    check_task_files(plain["task"], resolve)
    check_pair(plain, resolve)
    check_removal_stage(plain, resolve)
