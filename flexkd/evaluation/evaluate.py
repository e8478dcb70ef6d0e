"""Scoring one model on one task: the harness's own metrics, plus lm-eval for causal LMs.

Both kinds land in one flat dict (accuracy / macro_f1 / mcc, or loss / perplexity, and for
causal LMs lm-eval's rouge1/2/L, perplexity_word, acc ...), with the eval settings beside
them, since lm-eval scores move with batch size, max tokens and seeds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from omegaconf import OmegaConf

from flexkd.data.encoding import label_word_ids
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.evaluation.harness_metrics import evaluate_model
from flexkd.models import TaskModel

log = logging.getLogger(__name__)


DEFAULT_MAX_NEW_TOKENS = 64


def lm_eval_settings(eval_cfg, task: TaskSpec | None = None):
    """The bridge's settings from the `eval` config. New tokens per answer: `eval.max_gen_toks`
    when set (a sweep-wide override), else the task's `max_new_tokens`, else 64."""
    from flexkd.evaluation.lm_eval_bridge import LmEvalSettings

    cfg = OmegaConf.to_container(eval_cfg, resolve=True) if OmegaConf.is_config(eval_cfg) else dict(eval_cfg)
    max_new = cfg.get("max_gen_toks")
    if max_new is None:
        max_new = getattr(task, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
    try:
        return LmEvalSettings(batch_size=cfg["batch_size"], limit=cfg.get("limit"),
                              max_gen_toks=int(max_new), until=list(cfg.get("until") or []),
                              sampling=cfg["sampling"], temperature=cfg["temperature"],
                              top_k=cfg.get("top_k", 0), top_p=cfg.get("top_p", 1.0),
                              seeds=list(cfg["seeds"]), perplexity=cfg["perplexity"],
                              max_length=cfg.get("max_length"))
    except ValueError as e:  # its message names the eval.<key> to change
        raise ConfigError(str(e)) from None


def context_window(settings, task: TaskSpec, backbone) -> int:
    """HFLM's max_length when `eval.max_length` is null: room for a context as long as in
    training (task.max_length) plus the answer, within the model's position limit."""
    window = task.max_length + (settings.max_gen_toks if task.format == "instruction" else 0)
    limit = getattr(backbone.config, "max_position_embeddings", None) \
        or getattr(backbone.config, "n_positions", None)
    if limit:
        window = min(window, int(limit))
    if task.format == "instruction" and settings.max_gen_toks >= window:
        raise ConfigError(f"eval.max_gen_toks / task.max_new_tokens={settings.max_gen_toks} leaves "
                          f"no room for the prompt in the model's {window} positions; lower it")
    return window


def single_token_label_ids(model: TaskModel, tokenizer, task: TaskSpec) -> list[int] | None:
    """For a causal LM on a classification task whose label words are one token each: those
    tokens (the harness then scores accuracy itself; lm-eval's `acc` covers longer labels)."""
    if model.kind != "causal_lm" or task.format != "classification":
        return None
    ids = label_word_ids(tokenizer, task.label_names)
    if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
        return [i[0] for i in ids]
    log.info("label words of %s are not single distinct tokens: accuracy comes from lm-eval "
             "(`acc`) only", task.name)
    return None


def uses_lm_eval(model: TaskModel, eval_cfg) -> bool:
    return model.kind == "causal_lm" and bool(eval_cfg.lm_eval)


def evaluate_on_task(model: TaskModel, tokenizer, task: TaskSpec, loader, eval_cfg,
                     side: str = "student", who: str = "student",
                     harness_metrics: dict | None = None) -> dict:
    """{"metrics": {...}, "samples": [...], "settings": {...}} for the task's test split.

    `harness_metrics`, when already known (a cached teacher), skips recomputing them."""
    metrics = dict(harness_metrics) if harness_metrics is not None else evaluate_model(
        model, loader, side=side, desc=f"{who} test",
        label_ids=single_token_label_ids(model, tokenizer, task))
    report = {"metrics": metrics, "samples": [], "settings": {}}
    if uses_lm_eval(model, eval_cfg):
        from flexkd.evaluation.lm_eval_bridge import LmEvalTask, evaluate_causal_lm

        settings = lm_eval_settings(eval_cfg, task)
        if settings.max_length is None:
            # The model sees contexts cut as in training (HFLM keeps their end).
            settings.max_length = context_window(settings, task, model.backbone)
        lm_task = LmEvalTask(task.name, task.format, str(task.data_dir), "test",
                             task.label_names or None, task.max_prompt_words, task.prompt_template)
        log.info("lm-eval: scoring the %s on %s (%s)", who, task.name, asdict(settings))
        scored = evaluate_causal_lm(model.backbone, tokenizer, lm_task, settings)
        metrics.update(scored["metrics"])
        report["samples"] = scored["samples"]
        report["settings"] = scored["settings"]
        if eval_cfg.tasks:
            from flexkd.evaluation.lm_eval_bridge import evaluate_stock_tasks

            metrics.update(evaluate_stock_tasks(model.backbone, tokenizer, list(eval_cfg.tasks),
                                                settings)["metrics"])
    return report


def _shorten(text, limit: int = 400):
    """Prompts (whole articles) are cut for results.json and the W&B table."""
    return text if not isinstance(text, str) or len(text) <= limit else text[:limit] + " ..."


def merge_samples(student: list[dict], teacher: list[dict]) -> list[dict]:
    """One row per prompt: prompt, reference, the student's and the teacher's outputs."""
    by_prompt = {s.get("prompt"): s.get("output") for s in teacher}
    return [{"prompt": _shorten(s.get("prompt")), "reference": s.get("reference"),
             "student": s.get("output"), "teacher": by_prompt.get(s.get("prompt"))}
            for s in student]
