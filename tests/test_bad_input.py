"""Bad input, from the command line and from files: one case per row of docs/bad_input.md.

Each case triggers its error in-process (compose the config as run.py does, then the step of
the run that reads it) and checks the error type and the key parts of the message. The
catalogue's message column is generated from these same cases, so after changing a message
regenerate it:

    .venv/bin/python tests/test_bad_input.py        # rewrites docs/bad_input.md

and the parametrised test fails while a row is stale. A few cases also run through run.py.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # when run as a script

from flexkd.data.alignment import AlignmentError  # noqa: E402
from flexkd.data.datamodule import DistillDataModule  # noqa: E402
from flexkd.data.tasks import TaskSpec  # noqa: E402
from flexkd.errors import ConfigError, DataFileError, NonFiniteLossError, UserError  # noqa: E402
from flexkd.fixtures import fixture_path  # noqa: E402
from flexkd.sources import resolve_source  # noqa: E402
from flexkd.validation import validate_config  # noqa: E402

CONF = ROOT / "conf"
DOC = ROOT / "docs" / "bad_input.md"
BASE = ("pair=tiny_encoder", "task=tiny_cls")
LABELS = ["negative", "positive"]
ROWS = {  # a 4-row classification task; every split the same
    "train": [{"text": "a good film", "label": 1}, {"text": "a dull film", "label": 0},
              {"text": "good and warm", "label": "positive"}, {"text": "weak plot", "label": 0}],
}
ROWS["validation"] = ROWS["test"] = ROWS["train"]


# ----------------------------------------------------------------------------- environment

class Env:
    """What a case needs: config composition, a scratch dir, and the run's first steps."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def fmt(self, text: str) -> str:
        return text.replace("{tmp}", str(self.tmp))

    def compose(self, *overrides: str, base=BASE):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[*base, *(self.fmt(o) for o in overrides)])

    def resolve(self, source: str) -> str:
        return resolve_source(source, self.tmp / "cache")

    def validate(self, *overrides: str, base=BASE) -> None:
        validate_config(self.compose(*overrides, base=base), self.resolve)

    def load_data(self, *overrides: str, base=BASE) -> DistillDataModule:
        """Validate, then read and encode every split, as the run does before training."""
        from flexkd.pipeline import load_tokenizers

        cfg = self.compose(*overrides, base=base)
        validate_config(cfg, self.resolve)
        task = TaskSpec.from_config(cfg.task, self.resolve)
        s_tok, t_tok = load_tokenizers(cfg, self.resolve)
        data = DistillDataModule(task, s_tok, t_tok, batch_size=2)
        data.setup()
        return data

    # ---------------------------------------------------------------- inputs
    def task_dir(self, name: str = "data", **splits: str) -> Path:
        """A classification task folder; `splits` replace a split file's text."""
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(json.dumps({"label_names": LABELS}))
        for split, rows in ROWS.items():
            text = splits.get(split, "".join(json.dumps(r) + "\n" for r in rows))
            if text is None:
                continue
            if isinstance(text, bytes):
                (folder / f"{split}.jsonl").write_bytes(text)
            else:
                (folder / f"{split}.jsonl").write_text(text)
        return folder

    def tokenizer(self, name: str, keep_vocab: int | None = None, no_sep: bool = False,
                  delete: str | None = None) -> Path:
        """A variant of the fixture tokenizer: a smaller vocabulary, no [SEP] appended, or a
        normaliser that deletes what the regex `delete` matches."""
        src = fixture_path("tiny_tokenizer")
        folder = self.tmp / name
        shutil.copytree(src, folder)
        spec = json.loads((folder / "tokenizer.json").read_text())
        if keep_vocab is not None:
            vocab = spec["model"]["vocab"]
            spec["model"]["vocab"] = {t: i for t, i in vocab.items() if i < keep_vocab}
        if no_sep:
            spec["post_processor"]["single"] = spec["post_processor"]["single"][:2]
        if delete is not None:
            spec["normalizer"] = {"type": "Sequence", "normalizers": [
                spec["normalizer"], {"type": "Replace", "pattern": {"Regex": delete}, "content": ""}]}
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        return folder


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    section: str                        # "config", "file" or "run"
    shown: str                          # the command or input, as the doc shows it
    trigger: Callable[[Env], object]
    error: type[BaseException] | None   # None: handled (no error), see `expect`
    expect: tuple[str, ...]             # substrings of the message ({tmp}: the scratch dir)
    note: str = ""
    exit_status: str = "2"
    extra: dict = field(default_factory=dict)


def cli(*overrides: str, base=BASE) -> str:
    return "`python run.py " + " ".join([*base, *overrides]).replace("{tmp}", "<tmp>") + "`"


def config_case(id, overrides, expect, note="", base=BASE, error=ConfigError) -> Case:
    return Case(id, "config", cli(*overrides, base=base),
                lambda env: env.validate(*overrides, base=base), error, tuple(expect), note)


def hydra_case(id, overrides, error, expect, note="", base=BASE) -> Case:
    return Case(id, "config", cli(*overrides, base=base),
                lambda env: env.compose(*overrides, base=base), error, tuple(expect), note,
                exit_status="1")


def file_case(id, shown, splits, expect, error=DataFileError, note="") -> Case:
    def trigger(env: Env):
        env.task_dir(**splits)
        return env.load_data("task.data_dir={tmp}/data")
    return Case(id, "file", f"`task.data_dir=<tmp>/data` where {shown}", trigger, error,
                tuple(expect), note)


def _logit_vocab(env: Env):
    tok = env.tokenizer("small_vocab_tokenizer", keep_vocab=100)
    env.validate("strategy=logit_kd", f"pair.teacher.tokenizer={tok}",
                 base=("pair=tiny_causal", "task=tiny_instruct"))


def _cache_under_a_file(env: Env):
    (env.tmp / "a_file").write_text("not a folder")
    env.validate("cache_dir={tmp}/a_file/cache")


def _unalignable_tokenizers(env: Env):
    """Pre-flight validation alone (no teacher stage) refuses the pair for strategy=flexkd."""
    tok = env.tokenizer("vowel_cut_tokenizer", delete="[aeiouAEIOU]\\w*")
    env.task_dir()
    env.validate("task.data_dir={tmp}/data", f"pair.teacher.tokenizer={tok}")


def _nan_loss(env: Env):
    """One training step of logit_kd on the tiny encoder pair whose logit term is NaN."""
    import torch

    import flexkd.losses
    from flexkd.models import build_model
    from flexkd.module import DistillationModule
    from flexkd.strategies import SetupContext, build_strategy

    env.task_dir()
    data = env.load_data("task.data_dir={tmp}/data", "strategy=logit_kd")
    tok = data.tokenizers["student"]
    cfg = env.compose("strategy=logit_kd")
    spec = {side: dict(cfg.pair[side], init=dict(cfg.pair[side].init)) for side in ("student", "teacher")}
    student = build_model(spec["student"], "classification", tok, LABELS)
    teacher = build_model(spec["teacher"], "classification", tok, LABELS)
    strategy = build_strategy("logit_kd", gamma=1.0)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=data))
    module = DistillationModule(student, strategy, teacher=teacher)
    batch = next(iter(data.train_dataloader()))
    original = flexkd.losses.logit_divergence
    flexkd.losses.logit_divergence = lambda *a, **k: original(*a, **k) * torch.tensor(math.nan)
    try:
        with warnings.catch_warnings():  # self.log() outside a Trainer
            warnings.simplefilter("ignore")
            module.training_step(batch, 0)
    finally:
        flexkd.losses.logit_divergence = original


def _truncation(env: Env):
    long_rows = "".join(json.dumps({"text": " ".join(["good"] * 20), "label": 1}) + "\n"
                        for _ in range(4))
    env.task_dir(train=long_rows, validation=long_rows, test=long_rows)
    env.load_data("task.data_dir={tmp}/data", "task.max_length=8")


def _broken_meta(env: Env):
    (env.task_dir() / "meta.json").write_text('{"label_names": ["negative", "positive"]')
    env.load_data("task.data_dir={tmp}/data")


CASES = [
    # ------------------------------------------------------------------ config: groups, keys
    hydra_case("unknown-pair-option", ["pair=nope"], MissingConfigException,
               ["Could not find 'pair/nope'"],
               "Hydra's own error; it then lists the available options: "
               "mpnet_minilm, ..., tiny_encoder_same", base=("task=tiny_cls",)),
    hydra_case("unknown-task-option", ["task=nope"], MissingConfigException,
               ["Could not find 'task/nope'"],
               "Hydra's own error; it then lists the available tasks", base=("pair=tiny_encoder",)),
    hydra_case("unknown-strategy-option", ["strategy=nope"], MissingConfigException,
               ["Could not find 'strategy/nope'"],
               "Hydra's own error; it then lists the strategy configs"),
    hydra_case("typo-key-without-plus", ["strategy.tempreature=3"], ConfigCompositionException,
               ["Could not override 'strategy.tempreature'"],
               "Hydra's own error; it suggests `+strategy.tempreature=3`, which "
               "flexkd then rejects (next row)"),
    config_case("typo-key-with-plus", ["+strategy.tempreature=3"],
                ["strategy.tempreature", "did you mean strategy.temperature", "valid keys"]),
    config_case("unknown-top-level-key", ["+optimm.lr=0.1"],
                ["optimm is not a key of the config", "did you mean optim"]),
    config_case("unknown-strategy-name", ["strategy.name=nope"],
                ["strategy.name='nope'", "not a strategy config", "cka, flexkd, logit_kd, "
                 "projection, raw, seqkd, sft"],
                "the name must be a strategy option (a conf/strategy/*.yaml on Hydra's search path)"),
    config_case("strategy-target-not-importable", ["strategy._target_=mine.Mirror"],
                ["strategy._target_='mine.Mirror' cannot be imported", "PYTHONPATH"],
                "a strategy yaml of one's own whose module is not on PYTHONPATH"),
    config_case("flexkd-key-on-other-strategy", ["strategy=cka", "+strategy.k=16"],
                ["strategy.k is not a key of strategy 'cka'", "valid keys"]),
    config_case("unknown-logger-name", ["logger.name=foo"],
                ["logger.name='foo'", "csv, wandb"]),
    config_case("unknown-trainer-argument", ["+trainer.max_step=5"],
                ["trainer.max_step", "did you mean trainer.max_steps"]),
    # ------------------------------------------------------------------ config: types, values
    config_case("seed-negative", ["seed=-1"], ["seed=-1", "must be >= 0"]),
    Case("cache-dir-cannot-be-created", "config", cli("cache_dir=<tmp>/a_file/cache"),
         _cache_under_a_file, ConfigError,
         ("cache_dir='{tmp}/a_file/cache' cannot be created", "is not a folder"),
         "`<tmp>/a_file` is a regular file"),
    config_case("beta-not-a-number", ["strategy.beta=abc"],
                ["strategy.beta='abc' is not a number", ">= 0"]),
    config_case("batch-size-not-int", ["data.batch_size=1.5"],
                ["data.batch_size=1.5 is not an integer", ">= 1"]),
    config_case("temperature-zero", ["strategy.temperature=0"],
                ["strategy.temperature=0", "must be > 0"]),
    config_case("gamma-negative", ["strategy.gamma=-0.5"],
                ["strategy.gamma=-0.5", "must be >= 0"]),
    config_case("k-zero", ["strategy.k=0"], ["strategy.k=0", "must be >= 1"]),
    config_case("probe-examples-one", ["strategy.probe_examples=1"],
                ["strategy.probe_examples=1", "must be >= 2"]),
    config_case("unknown-score", ["strategy.score=gradient"],
                ["strategy.score='gradient'", "grad, grad_x_act, fisher, activation, random"]),
    config_case("unknown-divergence", ["strategy.divergence=kl"],
                ["strategy.divergence='kl'", "forward, reverse, jsd, skl, srkl, uld"]),
    config_case("unknown-task-format", ["task.format=regression"],
                ["task.format='regression'", "classification, instruction"]),
    config_case("max-length-too-small", ["task.max_length=4"],
                ["task.max_length=4", "must be >= 8"]),
    config_case("main-metric-of-other-format", ["task.main_metric=perplexity"],
                ["task.main_metric='perplexity'", "accuracy, macro_f1, mcc"]),
    config_case("unknown-model-type", ["pair.student.init.model_type=bertt"],
                ["pair.student.init.model_type='bertt'", "did you mean bert"]),
    # ------------------------------------------------------------------ config: pair x strategy
    config_case("raw-mismatched-widths", ["strategy=raw"],
                ["strategy=raw", "d_S=32", "d_T=128", "strategy=projection", "strategy=flexkd"]),
    config_case("layer-out-of-range", ["strategy.layer_pairs=[[-1,5]]"],
                ["strategy.layer_pairs[0][1]=5", "teacher", "3 layers", "0..3 or -4..-1"]),
    config_case("k-above-student-width", ["strategy.k=64"],
                ["strategy.k=64", "student width d_S=32"]),
    config_case("trainable-layers-above-depth", ["optim.trainable_layers=5"],
                ["optim.trainable_layers=5", "2 blocks"]),
    Case("logit-kd-across-vocabularies", "config",
         cli("strategy=logit_kd", "pair.teacher.tokenizer=<tmp>/small_vocab_tokenizer",
             base=("pair=tiny_causal", "task=tiny_instruct")),
         _logit_vocab, ConfigError,
         ("strategy.gamma=1.0", "logit KD needs one vocabulary", "100 output tokens",
          "140", "strategy.gamma=0"),
         "the teacher's tokenizer keeps 100 of the fixture tokenizer's 140 tokens"),
    # ------------------------------------------------------------------ data folder and files
    config_case("data-dir-missing", ["task.data_dir={tmp}/nowhere"],
                ["task.data_dir=", "folder not found", "train.jsonl"]),
    file_case("data-file-missing", "`validation.jsonl` does not exist", {"validation": None},
              ["data file not found", "validation.jsonl"], error=ConfigError),
    file_case("malformed-json-line", "line 2 of `train.jsonl` is `{\"text\": \"good\", "
              "\"label\": 1`", {"train": '{"text": "ok", "label": 0}\n{"text": "good", "label": 1\n'},
              ["train.jsonl:2", "not valid JSON", "column"]),
    file_case("row-not-an-object", "line 1 of `train.jsonl` is `[\"good\", 1]`",
              {"train": '["good", 1]\n'}, ["train.jsonl:1", "expected a JSON object, got list"]),
    file_case("missing-field", "line 1 of `train.jsonl` is `{\"text\": \"good\"}`",
              {"train": '{"text": "good"}\n'}, ["train.jsonl:1", "missing field(s) ['label']"]),
    file_case("wrong-field-type", "line 1 of `train.jsonl` is `{\"text\": 5, \"label\": 1}`",
              {"train": '{"text": 5, "label": 1}\n'},
              ["train.jsonl:1", "field 'text' must be a string, got int 5"]),
    file_case("empty-split", "`test.jsonl` is empty", {"test": ""},
              ["test.jsonl", "the split is empty"]),
    file_case("label-index-out-of-range", "line 1 of `train.jsonl` is "
              "`{\"text\": \"good\", \"label\": 7}`", {"train": '{"text": "good", "label": 7}\n'},
              ["train.jsonl:1", "label 7 is outside the label set", "0..1"]),
    file_case("label-unknown-name", "line 1 of `train.jsonl` is "
              "`{\"text\": \"good\", \"label\": \"neutral\"}`",
              {"train": '{"text": "good", "label": "neutral"}\n'},
              ["train.jsonl:1", "label 'neutral' is outside the label set"]),
    file_case("not-utf8", "line 2 of `train.jsonl` holds the Latin-1 byte 0xe9",
              {"train": b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n'},
              ["train.jsonl:2", "not UTF-8"]),
    Case("meta-json-malformed", "file", "`task.data_dir=<tmp>/data` where `meta.json` lacks "
         "its closing brace", _broken_meta, ConfigError, ("meta.json", "not valid JSON")),
    Case("tokenizers-cannot-be-aligned", "file",
         cli("task.data_dir=<tmp>/data", "pair.teacher.tokenizer=<tmp>/vowel_cut_tokenizer"),
         _unalignable_tokenizers, AlignmentError,
         ("train.jsonl:1: teacher and student tokens cannot be aligned by characters",
          "in 'a good film'", "student tokens ['[CLS]', 'a', 'good', 'film', '[SEP]']",
          "teacher tokens", "strategy without token features (sft)"),
         "pre-flight validation, before the teacher stage: the teacher's normaliser deletes each "
         "word from its first vowel on; strategy=sft runs on this pair"),
    Case("prompt-longer-than-max-length", "file",
         cli("task.data_dir=<tmp>/data", "task.max_length=8") + " with rows longer than 8 tokens",
         _truncation, None, ("truncated 4 of 4 examples to max_length=8",),
         "handled, not an error: the text is cut to max_length (the final [SEP] / the response "
         "are kept), and the count per split is logged at INFO", exit_status="-"),
    # ------------------------------------------------------------------ during the run
    Case("nan-loss", "run", cli("strategy=logit_kd") + " when the logit term becomes NaN",
         _nan_loss, NonFiniteLossError, ("loss term 'logit' is nan at step 0",),
         "test: `flexkd.losses.logit_divergence` patched to return NaN"),
]


# ----------------------------------------------------------------------------- running a case

def run_case(case: Case, tmp: Path) -> tuple[BaseException | None, str]:
    """(the error, the first line the user sees), or (None, the log line) for handled cases."""
    env = Env(tmp)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("flexkd")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        case.trigger(env)
    except (UserError, MissingConfigException, ConfigCompositionException) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        return e, (f"flexkd: error: {first}" if isinstance(e, UserError) else first)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [r.getMessage() for r in records if "truncated" in r.getMessage()]
    return None, (f"INFO {lines[0]}" if lines else "")


def normalise(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp.resolve()), "<tmp>").replace(str(tmp), "<tmp>")
    return text.replace(str(ROOT), "<repo>")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    error, line = run_case(case, tmp_path)
    if case.error is None:
        assert error is None
    else:
        assert isinstance(error, case.error), f"{case.id}: got {type(error).__name__}: {error}"
        if isinstance(error, UserError):
            assert "\n" not in str(error), "user errors are one line"
    for part in case.expect:
        assert part.replace("{tmp}", str(tmp_path)) in line, f"{part!r} not in {line!r}"
    assert f"`{cell(normalise(line, tmp_path))}`" in DOC.read_text(), (
        f"docs/bad_input.md is stale for {case.id}; regenerate: python tests/test_bad_input.py")


def test_catalogue_covers_every_case():
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == len(CASES) >= 18
    for case in CASES:
        assert f"| {case.id} |" in text


# ----------------------------------------------------------------------------- no false alarms

def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_shipped_option_passes_the_schemas(tmp_path):
    """Each option of each group (one at a time) passes the schema layer; real pairs and tasks
    too (their assets are not touched: `check_schema` reads no files)."""
    from flexkd.validation import check_schema

    env = Env(tmp_path)
    groups = ["pair", "task", "strategy", "trainer", "logger", "teacher_finetune", "eval",
              "experiment"]
    for group in groups:
        for option in _options(group):
            base = tuple(b for b in BASE if not b.startswith(f"{group}="))
            check_schema(env.compose(f"{group}={option}", base=base))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_job_of_every_experiment_sweep_passes_the_schemas(experiment, tmp_path):
    """An experiment's sweeper params expand to jobs; each job's config must be valid."""
    import itertools

    from flexkd.validation import check_schema

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose("config", overrides=[f"experiment={experiment}"],
                            return_hydra_config=True)
    params = dict(hydra_cfg.hydra.sweeper.get("params") or {})
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    for job in itertools.product(*axes) if axes else [()]:
        check_schema(Env(tmp_path).compose(f"experiment={experiment}", *job, base=()))


@pytest.mark.parametrize("pair,task,strategies", [
    ("tiny_encoder", "tiny_cls", ["flexkd", "projection", "cka", "logit_kd", "sft"]),
    ("tiny_encoder_same", "tiny_cls", ["raw", "flexkd"]),
    ("tiny_causal", "tiny_instruct", ["flexkd", "projection", "cka", "logit_kd", "sft"]),
])
def test_tiny_pairs_validate(pair, task, strategies, tmp_path):
    env = Env(tmp_path)
    for strategy in strategies:
        env.validate(f"strategy={strategy}", base=(f"pair={pair}", f"task={task}"))
    env.validate("strategy.layer_pairs=[[0,0],[-3,-4],[2,3]]", "strategy.k=32",
                 "optim.trainable_layers=2", base=("pair=tiny_encoder", "task=tiny_cls"))


# ----------------------------------------------------------------------------- through run.py



def assert_one_line_error(run, *parts: str) -> None:
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("flexkd: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    for part in parts:
        assert part in lines[0]
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.slow
def test_cli_unknown_group_option_is_hydras_error(run_cli):
    run = run_cli("pair=nope", check=False, fast=False)
    assert run.returncode == 1
    assert "Could not find 'pair/nope'" in run.stderr and "tiny_encoder" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.slow
def test_cli_unknown_logger_name(run_cli):
    run = run_cli(*BASE, "logger.name=foo", check=False)
    assert_one_line_error(run, "logger.name='foo'", "csv, wandb")


@pytest.mark.slow
def test_cli_missing_data_file(run_cli, tmp_path):
    Env(tmp_path).task_dir(validation=None)
    run = run_cli(*BASE, f"task.data_dir={tmp_path}/data", check=False)
    assert_one_line_error(run, "data file not found", "validation.jsonl")


@pytest.mark.slow
def test_cli_typo_key(run_cli):
    run = run_cli(*BASE, "+strategy.tempreature=3", check=False)
    assert_one_line_error(run, "strategy.tempreature", "did you mean strategy.temperature")


# ----------------------------------------------------------------------------- the catalogue

HEADER = """# Bad input: what the user sees

Every row is a case in `tests/test_bad_input.py`, which checks the error type and the key
parts of the message; the message column is generated by running the cases (do not edit it
by hand):

    .venv/bin/python tests/test_bad_input.py     # rewrites this file

A user error reaches the terminal as one line on stderr, `flexkd: error: <message>`, then
`flexkd: (run with debug=true for the traceback)`, and `run.py` exits with status 2 (in a
multirun the job is recorded as failed and the sweep goes on). `debug=true` raises it with its
traceback. Errors of Hydra's own (an unknown group option, overriding a key that does not
exist) come before flexkd runs: Hydra prints its message and exits with status 1.

Checks run in this order, so a config mistake is reported before any model is loaded:

1. `flexkd.validation.validate_config(cfg, resolve)`, called first by `flexkd.pipeline.run`: schemas of
   every config group (unknown keys, types, ranges, choices), the task folder, and the
   pair-level checks that need model configs only (widths, depths, vocabularies).
2. Reading the task files (`flexkd/data/jsonl.py`, `encoding.py`): errors name `file:line`.
3. Training: a NaN/Inf loss term stops the run, naming the term and the step.

`<tmp>` stands for a scratch folder, `<repo>` for the repository. The commands use the tiny
fixture pair and task (`{base}`) unless they say otherwise.

## Prompts longer than `task.max_length`

Not an error. Token sequences longer than `task.max_length` are cut: a classification text
keeps its first `max_length - 1` tokens and its final special token ([SEP] / `</s>`); an
instruction row keeps its response (up to `max(max_length // 2, max_length - prompt)` tokens)
and the end of its prompt. The number cut per split is logged at INFO as
`<task>/<split>: truncated N of M examples to max_length=L` (row
"prompt-longer-than-max-length").

## Cases

| # | Case | Command or input | First line of the message | Exit | Notes |
|---|------|------------------|---------------------------|------|-------|
"""


def write_catalogue() -> None:
    import tempfile

    rows = []
    for n, case in enumerate(CASES, start=1):
        with tempfile.TemporaryDirectory() as tmp:
            error, line = run_case(case, Path(tmp))
            if case.error is not None and not isinstance(error, case.error):
                raise SystemExit(f"{case.id}: expected {case.error.__name__}, got {error!r}")
            message = normalise(line, Path(tmp))
        rows.append(f"| {n} | {case.id} | {cell(case.shown)} | "
                    f"`{cell(message)}` | {case.exit_status} | {cell(case.note)} |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(HEADER.replace("{base}", " ".join(BASE)) + "\n".join(rows) + "\n")
    print(f"wrote {DOC} ({len(rows)} cases)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    write_catalogue()
