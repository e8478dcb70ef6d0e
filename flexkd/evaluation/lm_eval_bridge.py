"""Score an in-memory causal LM with lm-evaluation-harness (lm-eval 0.4.13).

The harness's own JSON Lines tasks (``{train,validation,test}.jsonl`` in one folder) are turned
into lm-eval task configs *as dicts* and passed straight to :func:`lm_eval.simple_evaluate`,
which in 0.4.13 hands every ``dict`` entry of ``tasks`` to ``TaskManager.load`` (an inline
config needs a ``"task"`` key). We build a ``TaskManager(include_defaults=False)`` ourselves:
the default one indexes ~15k stock YAML configs (~7 s) that inline tasks never use, and an
empty index also means a harness task name can never be merged with a stock task of the same
name.

What is scored, per task format
-------------------------------
``classification`` (rows ``{"text": str, "label": int}``)
    ``multiple_choice``: context ``format_classification_context(text)``, one continuation per
    label ``format_label_choice(name)`` (exactly one leading space: the choices carry the space
    and ``target_delimiter`` is ``""``). Metrics ``acc`` and ``acc_norm`` (lm-eval's: argmax of
    the summed log-likelihood, resp. of log-likelihood / character length of the choice).

``instruction`` (rows ``{"prompt": str, "response": str}``)
    ``generate_until`` from ``render_prompt(prompt, tokenizer, task.prompt_template)`` (as in
    training), stopping at the EOS token string or any of ``settings.until`` (default none:
    multi-line answers are generated whole), at most ``max_gen_toks`` new tokens; greedy, or
    (``sampling=True``) one run per seed with ``temperature``, ``top_k`` (0: off) and
    ``top_p`` passed explicitly to ``generate`` (see ``generation_kwargs``), each run seeded
    through ``simple_evaluate``'s random/numpy/torch seeds.
    ROUGE-1/2/L F-measure (``rouge_score``, Porter stemmer, x100) is computed per example in
    ``process_results`` against the stripped reference response and averaged. With sampling the
    reported ``rouge*`` are means over seeds, ``rouge*_std`` the sample standard deviation over
    seeds (ddof=1; 0.0 for one seed), and ``num_seeds``; per-seed values are under
    ``"per_seed"``.

    Perplexity (``perplexity=True``) uses lm-eval's ``loglikelihood_rolling`` on the held-out
    responses: the rolled text is ``response.strip()`` alone, *not conditioned on the prompt*
    (lm-eval prefixes one token - BOS, else EOS, or the tokenizer's leading special token, see
    below - and rolls windows of the model's max length). EOS is not scored.
    Reported as ``perplexity_word``, ``perplexity_byte`` and ``bits_per_byte`` exactly as lm-eval
    aggregates them (corpus-level: exp(-sum ll / sum words|bytes)); words are lm-eval's
    whitespace split. It runs once, with the greedy / first-seed call.

Special tokens: every context starts exactly as in training (``causal_context``): the BOS
token if the tokenizer has one, then the text without special tokens. HFLM therefore adds no
special tokens (a tokenizer that *appends* them, like the fixture's ``[CLS] $A [SEP]``, would
otherwise have lm-eval score the trailing ``[SEP]``), the BOS is put back as text in front of
every context, and it is the rolling prefix token. Recorded in ``settings``
(``add_special_tokens``, ``context_prefix``). Classification refuses
label names that encode to identical tokens (e.g. all ``[UNK]``).

Data are read with ``datasets.load_dataset("json", data_files={split: <absolute path>})``,
cached under the ``datasets`` cache like any other dataset.

Side effects are undone: the model's per-module train/eval flags, Python/NumPy/torch RNG
states (``simple_evaluate`` reseeds all three globally) and the ``lm_eval`` logger level are
restored; a tokenizer without a pad token is deep-copied before HFLM assigns one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flexkd.data.formatting import (
    format_classification_context,
    format_label_choice,
    render_prompt,
)
from flexkd.offline import set_offline_defaults

# Must happen before lm_eval / datasets / huggingface_hub read their configuration.
set_offline_defaults()

# At import, not in _preserve_state: importing lightning draws from the global RNGs (and loads
# huggingface_hub, hence after the offline defaults).
from lightning.pytorch.utilities.seed import isolate_rng  # noqa: E402

__all__ = [
    "LmEvalSettings",
    "LmEvalTask",
    "evaluate_causal_lm",
    "evaluate_stock_tasks",
]

MAX_SAMPLES = 20
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
PERPLEXITY_KEYS = {
    "word_perplexity": "perplexity_word",
    "byte_perplexity": "perplexity_byte",
    "bits_per_byte": "bits_per_byte",
}
TASK_FORMATS = ("classification", "instruction")
# Messages lm-eval emits at WARNING for every in-memory model; expected here, so dropped.
_BENIGN_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@dataclass
class LmEvalTask:
    name: str  # harness task name, e.g. "tiny_instruct"
    format: str  # "classification" | "instruction"
    data_dir: str  # folder holding {train,validation,test}.jsonl
    split: str = "test"
    label_names: list[str] | None = None  # classification only; rows {"text", "label": int}
    max_prompt_words: int | None = None  # instruction: keep the prompt's first N words
    prompt_template: str = "plain"  # instruction: plain | chat (flexkd.data.formatting)
    # instruction rows are {"prompt": str, "response": str}

    def __post_init__(self) -> None:
        if self.format not in TASK_FORMATS:
            raise ValueError(f"task {self.name!r}: format {self.format!r} not in {TASK_FORMATS}")
        if self.format == "classification" and not self.label_names:
            raise ValueError(f"task {self.name!r}: classification needs label_names")
        # data_files resolve against the CWD inside `datasets`; pin them now.
        self.data_dir = str(Path(self.data_dir).expanduser().resolve())

    @property
    def data_file(self) -> str:
        return str(Path(self.data_dir) / f"{self.split}.jsonl")


@dataclass
class LmEvalSettings:
    batch_size: int = 8
    limit: int | None = None  # max examples per task
    max_gen_toks: int = 64  # new tokens per generation (lm-eval's name for max_new_tokens)
    # Stop strings besides EOS, which always stops generation: [] = EOS only, so multi-line
    # answers are generated whole (MiniLLM's protocol); ["\n"] = first line only.
    until: list[str] = field(default_factory=list)
    sampling: bool = False  # False: greedy; True: sample at the settings below, one run per seed
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter (HF's generate would otherwise apply its default 50)
    top_p: float = 1.0  # 1.0: no nucleus filter
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])  # used when sampling
    perplexity: bool = True  # loglikelihood_rolling on held-out responses (instruction tasks)
    max_length: int | None = None  # model context length passed to HFLM

    def __post_init__(self) -> None:
        # Plain lists (an OmegaConf ListConfig would not survive asdict / JSON).
        self.until = [str(u) for u in self.until]
        self.seeds = [int(s) for s in self.seeds]
        for name, ok, need in (("max_gen_toks", self.max_gen_toks >= 1, ">= 1"),
                               ("temperature", self.temperature > 0, "> 0"),
                               ("top_k", self.top_k >= 0, ">= 0 (0: disabled)"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1: disabled)")):
            if not ok:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be {need}")
        if "" in self.until:
            raise ValueError("eval.until contains an empty string, which would stop at once; "
                             "use [] for EOS only")
        if self.sampling and not self.seeds:
            raise ValueError("eval.sampling=true needs at least one seed in eval.seeds")


def generation_kwargs(settings: LmEvalSettings, eos: str | None, sample: bool) -> dict[str, Any]:
    """The ``generation_kwargs`` of a generate_until task. HFLM passes every key but
    ``until``/``max_gen_toks`` through to ``model.generate``, so sampling sets temperature,
    top_k and top_p explicitly: neither HF's defaults (top_k=50) nor a checkpoint's
    generation_config.json (e.g. top_p=0.9) can change the protocol."""
    until = list(settings.until)
    if eos and eos not in until:
        until.append(eos)
    kwargs: dict[str, Any] = {"until": until, "max_gen_toks": int(settings.max_gen_toks),
                              "do_sample": bool(sample)}
    if sample:
        kwargs.update(temperature=float(settings.temperature), top_k=int(settings.top_k),
                      top_p=float(settings.top_p))
    return kwargs


# --------------------------------------------------------------------------- task configs


class _InstructionContext:
    """``doc_to_text`` of instruction tasks: the BOS prefix, then the prompt rendered exactly
    as in training (`render_prompt`, which may need the tokenizer's chat template)."""

    def __init__(self, prefix: str, task: LmEvalTask, tokenizer) -> None:
        self.prefix, self.task, self.tokenizer = prefix, task, tokenizer

    def __call__(self, doc: dict) -> str:
        return self.prefix + render_prompt(doc["prompt"], self.tokenizer, self.task.prompt_template,
                                           self.task.max_prompt_words)

    def __deepcopy__(self, memo: dict) -> _InstructionContext:  # TaskManager deep-copies configs
        return self


def _doc_reference(doc: dict) -> str:
    return doc["response"].strip()


def _doc_classification_context(prefix: str, doc: dict) -> str:
    return prefix + format_classification_context(doc["text"])


def _doc_label(doc: dict) -> int:
    return int(doc["label"])


def _empty_context(doc: dict) -> str:
    return ""


class _RougeResults:
    """``process_results`` for generation: per-example ROUGE F-measure x100."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)

    def __call__(self, doc: dict, results: list) -> dict[str, float]:
        output = results[0] if results else ""
        scores = self._scorer.score(_doc_reference(doc), str(output))
        return {key: 100.0 * scores[key].fmeasure for key in ROUGE_KEYS}

    def __deepcopy__(self, memo: dict) -> _RougeResults:  # TaskManager deep-copies configs
        return self


def _dataset_fields(task: LmEvalTask) -> dict[str, Any]:
    if not Path(task.data_file).is_file():
        raise FileNotFoundError(f"task {task.name!r}: no {task.split} split at {task.data_file}")
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {task.split: task.data_file}},
        "test_split": task.split,
        "num_fewshot": 0,
    }


def _classification_config(task: LmEvalTask, prefix: str) -> dict[str, Any]:
    return {
        "task": task.name,
        **_dataset_fields(task),
        "output_type": "multiple_choice",
        "doc_to_text": functools.partial(_doc_classification_context, prefix),
        "doc_to_target": _doc_label,
        # The choice strings carry their single leading space, so no extra delimiter.
        "doc_to_choice": [format_label_choice(name) for name in task.label_names or []],
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def _generation_config(
    task: LmEvalTask, settings: LmEvalSettings, eos: str | None, sample: bool, prefix: str,
    tokenizer=None,
) -> dict[str, Any]:
    gen_kwargs = generation_kwargs(settings, eos, sample)
    return {
        "task": task.name,
        **_dataset_fields(task),
        "output_type": "generate_until",
        "doc_to_text": _InstructionContext(prefix, task, tokenizer),
        "doc_to_target": _doc_reference,
        "target_delimiter": "",
        "generation_kwargs": gen_kwargs,
        "process_results": _RougeResults(),
        "metric_list": [
            {"metric": key, "aggregation": "mean", "higher_is_better": True} for key in ROUGE_KEYS
        ],
        "metadata": {"version": 1.0},
    }


def _perplexity_config(task: LmEvalTask) -> dict[str, Any]:
    return {
        "task": f"{task.name}_perplexity",
        **_dataset_fields(task),
        "output_type": "loglikelihood_rolling",
        "doc_to_text": _empty_context,
        "doc_to_target": _doc_reference,  # the rolled text: the response alone
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }


# --------------------------------------------------------------------------- plumbing


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(text in msg for text in _BENIGN_WARNINGS)


@contextlib.contextmanager
def _quiet_lm_eval():
    logger = logging.getLogger("lm_eval")
    # A logger's filters only see records created on that very logger.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    old_level = logger.level
    drop = _DropBenign()
    logger.setLevel(logging.WARNING)
    hf_logger.addFilter(drop)
    import datasets

    bars_were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Generating test split" on every JSON load
    try:
        yield
    finally:
        if not bars_were_disabled:
            datasets.enable_progress_bars()
        hf_logger.removeFilter(drop)
        logger.setLevel(old_level)


@contextlib.contextmanager
def _preserve_state(model):
    """Restore per-module train/eval flags and the global RNGs that simple_evaluate reseeds."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    try:
        # Python, numpy, torch (and CUDA when in use: asking for it would initialise it).
        with isolate_rng(include_cuda=torch.cuda.is_initialized()):
            yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass(frozen=True)
class _SpecialTokens:
    """How the model's contexts get the tokenizer's special tokens (see ``_special_tokens``)."""

    add_special_tokens: bool | None  # HFLM ``add_bos_token``: None = tokenizer default
    context_prefix: str = ""  # text prepended to every context when add_special_tokens=False
    prefix_token_id: int | None = None  # first token for rolling loglikelihood


def _special_tokens(tokenizer) -> _SpecialTokens:
    """Contexts start exactly as in training (``flexkd.data.encoding.causal_context``): the BOS
    token, if the tokenizer has one, then the text with no special tokens. So HFLM adds none
    (``add_bos_token=False``: tokenizers that *append* specials, e.g. ``[CLS] $A [SEP]``,
    would otherwise have lm-eval score the trailing ``[SEP]``) and the BOS is put back as
    text in front of every context and as the rolling-loglikelihood prefix token."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return _SpecialTokens(add_special_tokens=False)
    return _SpecialTokens(add_special_tokens=False, context_prefix=tokenizer.bos_token,
                          prefix_token_id=bos_id)


def _check_label_choices(tokenizer, task: LmEvalTask) -> None:
    """Multiple choice only means something if every label continuation is its own tokens."""
    encoded: dict[tuple[int, ...], str] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name in task.label_names or []:
        ids = tuple(tokenizer(format_label_choice(name), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"task {task.name!r}: label {name!r} encodes to no tokens")
        if ids in encoded:
            raise ValueError(
                f"task {task.name!r}: labels {encoded[ids]!r} and {name!r} encode to the same "
                f"tokens {list(ids)} (unknown to the tokenizer?); every choice would score alike"
            )
        if unk is not None and unk in ids:
            logging.getLogger(__name__).warning(
                "task %r: label %r contains the unknown token", task.name, name
            )
        encoded[ids] = name


def _make_hflm(model, tokenizer, settings: LmEvalSettings, special: _SpecialTokens):
    from lm_eval.models.huggingface import HFLM

    class _QuietHFLM(HFLM):
        """HFLM without its per-request-type progress bars."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer needs an eos_token (lm-eval stops generation on it)")
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)  # HFLM assigns a pad token in place
    return _QuietHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=int(settings.batch_size),
        max_length=settings.max_length,
        add_bos_token=special.add_special_tokens,
        prefix_token_id=special.prefix_token_id,
    )


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _run(hflm, tasks: list, settings: LmEvalSettings, seed: int, task_manager=None) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=hflm,
        tasks=tasks,
        task_manager=task_manager,
        limit=settings.limit,
        bootstrap_iters=0,  # no stderr: the default 100k bootstrap is slow on perplexity
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # only non-zero ranks get None; this bridge is single-process
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return out


def _metric(results: dict, task_name: str, metric: str) -> float:
    value = results["results"][task_name][f"{metric},none"]
    return float(value)


def _settings_record(settings: LmEvalSettings, special: _SpecialTokens) -> dict[str, Any]:
    record = asdict(settings)
    record["seeds"] = list(settings.seeds) if settings.sampling else []
    record["greedy"] = not settings.sampling
    record["max_new_tokens"] = int(settings.max_gen_toks)
    record["lm_eval_version"] = _lm_eval_version()
    record["add_special_tokens"] = special.add_special_tokens  # None: tokenizer default
    record["context_prefix"] = special.context_prefix
    return record


def _generation_samples(results: dict, task_name: str) -> list[dict[str, str]]:
    logged = sorted(results.get("samples", {}).get(task_name, []), key=lambda s: s["doc_id"])
    samples = []
    for sample in logged[:MAX_SAMPLES]:
        output = sample["filtered_resps"][0] if sample["filtered_resps"] else ""
        samples.append(
            {
                "prompt": sample["doc"]["prompt"],
                "reference": _doc_reference(sample["doc"]),
                "output": str(output).strip(),
            }
        )
    return samples


def _classification_samples(results: dict, task_name: str, label_names: list[str]) -> list[dict[str, str]]:
    logged = sorted(results.get("samples", {}).get(task_name, []), key=lambda s: s["doc_id"])
    samples = []
    for sample in logged[:MAX_SAMPLES]:
        lls = [resp[0] for resp in sample["filtered_resps"]]
        pred = max(range(len(lls)), key=lls.__getitem__)
        samples.append(
            {
                "prompt": sample["doc"]["text"],
                "reference": label_names[_doc_label(sample["doc"])],
                "output": label_names[pred],
            }
        )
    return samples


def _num_examples(results: dict, task_name: str) -> int:
    n = results.get("n-samples", {}).get(task_name, {})
    return int(n.get("effective", 0))


# --------------------------------------------------------------------------- public API


def evaluate_causal_lm(model, tokenizer, task: LmEvalTask, settings: LmEvalSettings) -> dict:
    """Score ``model`` on one harness JSON Lines task through lm-eval (see module docstring).

    Returns ``{"metrics": {name: float}, "samples": [{prompt, reference, output}, ...<=20],
    "settings": {...}, "num_examples": int}`` and, when sampling, ``"per_seed"``:
    ``[{"seed": s, "rouge1": ..., "rouge2": ..., "rougeL": ...}, ...]``.
    Classification metrics: ``acc``, ``acc_norm``.
    Instruction metrics: ``rouge1``, ``rouge2``, ``rougeL`` (0-100) [+ ``*_std``, ``num_seeds``
    when sampling] [+ ``perplexity_word``, ``perplexity_byte``, ``bits_per_byte``].
    """
    if settings.sampling and not settings.seeds:
        raise ValueError("sampling=True needs at least one seed")
    if task.format == "classification":
        _check_label_choices(tokenizer, task)
    from lm_eval.tasks import TaskManager

    special = _special_tokens(tokenizer)
    prefix = special.context_prefix
    with _quiet_lm_eval(), _preserve_state(model):
        hflm = _make_hflm(model, tokenizer, settings, special)
        manager = TaskManager(include_defaults=False)
        report: dict[str, Any] = {"metrics": {}, "samples": [], "settings": {}}

        if task.format == "classification":
            label_names = list(task.label_names or [])
            results = _run(hflm, [_classification_config(task, prefix)], settings, 0, manager)
            report["metrics"] = {m: _metric(results, task.name, m) for m in ("acc", "acc_norm")}
            report["samples"] = _classification_samples(results, task.name, label_names)
            report["num_examples"] = _num_examples(results, task.name)
        else:
            eos = hflm.tokenizer.eos_token
            seeds = list(settings.seeds) if settings.sampling else [0]
            per_seed: list[dict[str, float]] = []  # one entry per run, in seeds order
            for i, seed in enumerate(seeds):
                tasks = [_generation_config(task, settings, eos, settings.sampling, prefix, tokenizer)]
                with_ppl = settings.perplexity and i == 0
                if with_ppl:
                    tasks.append(_perplexity_config(task))
                results = _run(hflm, tasks, settings, seed, manager)
                per_seed.append({k: _metric(results, task.name, k) for k in ROUGE_KEYS})
                if i == 0:
                    report["samples"] = _generation_samples(results, task.name)
                    report["num_examples"] = _num_examples(results, task.name)
                if with_ppl:
                    ppl_name = f"{task.name}_perplexity"
                    for lm_name, name in PERPLEXITY_KEYS.items():
                        report["metrics"][name] = _metric(results, ppl_name, lm_name)
            for key in ROUGE_KEYS:
                values = [run[key] for run in per_seed]
                report["metrics"][key] = statistics.fmean(values)
                if settings.sampling:
                    report["metrics"][f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if settings.sampling:
                report["metrics"]["num_seeds"] = float(len(seeds))
                report["per_seed"] = [{"seed": s, **run} for s, run in zip(seeds, per_seed, strict=True)]

    report["settings"] = _settings_record(settings, special)
    report["settings"].update({"task": task.name, "format": task.format, "split": task.split})
    if task.format == "instruction":
        # Exactly what generate_until was given (EOS included), and the prompt format.
        report["settings"]["generation_kwargs"] = generation_kwargs(settings, eos, settings.sampling)
        report["settings"]["prompt_template"] = task.prompt_template
    return report


@functools.lru_cache(maxsize=1)
def _stock_task_manager():
    """The default TaskManager indexes every stock YAML (~6 s); build it once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def evaluate_stock_tasks(model, tokenizer, task_names: list[str], settings: LmEvalSettings) -> dict:
    """Run stock lm-eval tasks by name with their own configs (prompts, generation kwargs).

    Their data comes from the Hugging Face Hub, so with ``HF_DATASETS_OFFLINE=1`` only tasks
    already in the local ``datasets`` cache work. Only ``batch_size``, ``limit`` and
    ``max_length`` of ``settings`` apply (seed 0; ``sampling``/``max_gen_toks`` are not
    imposed on stock tasks). Returns ``{"metrics": {f"{task}/{metric}": float}, "settings"}``;
    metrics under a filter other than ``none`` are named ``f"{task}/{metric}/{filter}"``.
    """
    import difflib

    task_names = list(task_names)
    special = _special_tokens(tokenizer)
    with _quiet_lm_eval(), _preserve_state(model):
        manager = _stock_task_manager()
        unknown = [name for name in task_names if name not in manager.all_tasks]
        if unknown:
            hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
            raise ValueError(f"unknown lm-eval task(s) {unknown}; close matches: {hints}")
        hflm = _make_hflm(model, tokenizer, settings, special)
        try:
            results = _run(hflm, task_names, settings, 0, manager)
        except ConnectionError as err:  # `datasets` in offline mode, data not cached
            raise RuntimeError(
                f"data for stock task(s) {task_names} is not in the local `datasets` cache and the "
                f"Hugging Face Hub is offline (HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE')})"
            ) from err

    metrics: dict[str, float] = {}
    for task_name, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filter_name = key.split(",", 1)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = f"{task_name}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")
            metrics[name] = float(value)
    settings_record = _settings_record(settings, special)
    settings_record["tasks"] = task_names
    return {"metrics": metrics, "settings": settings_record}
