"""Stage 2 of a run: the teacher, fine-tuned on the task when asked, cached by content hash.

A sweep over strategies and seeds therefore fine-tunes and evaluates each (teacher, task)
once. Every cache entry records its key and is verified on load; a bad entry is rebuilt.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.evaluation.evaluate import single_token_label_ids
from flexkd.evaluation.harness_metrics import evaluate_model
from flexkd.models import (
    TaskModel,
    apply_final_norm_state,
    build_model,
    load_saved_model,
    save_model,
    uses_label_words,
)
from flexkd.storage import atomic_directory, content_hash, file_sha256
from flexkd.training import autocast, make_trainer, runtime_device

log = logging.getLogger(__name__)

MARKER = "flexkd-cache.json"
CACHE_VERSION = 1


@dataclass
class Teacher:
    model: TaskModel
    fingerprint: str
    metrics: dict
    info: dict = field(default_factory=dict)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def teacher_key(spec: dict, task: TaskSpec, finetune: dict | None) -> str:
    return content_hash({"v": CACHE_VERSION, "spec": spec, "task": task.fingerprint(),
                         "finetune": finetune})


def file_manifest(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file below `root` (the entry's content record)."""
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def _valid_entry(path: Path, key: str) -> bool:
    """The entry is the one for `key` and every recorded file is there at its recorded size
    (a cheap check on each load; torn or truncated files fail it)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
        return marker.get("key") == key and "metrics.json" in files and all(
            (path / rel).stat().st_size == info["size"] for rel, info in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def finetune_teacher(model: TaskModel, task: TaskSpec, tokenizer, finetune: dict, trainer_cfg,
                     work_dir: Path, label_words: bool = False) -> None:
    """Train the teacher on the task with the task loss alone (the `sft` strategy)."""
    import lightning as L

    from flexkd.module import DistillationModule
    from flexkd.strategies import build_strategy

    L.seed_everything(finetune.get("seed", 0), workers=True, verbose=False)
    data = DistillDataModule(task, tokenizer, batch_size=finetune["batch_size"],
                             seed=finetune.get("seed", 0), label_words=label_words)
    module = DistillationModule(model, build_strategy("sft"), teacher=None, lr=finetune["lr"],
                                weight_decay=finetune.get("weight_decay", 0.01),
                                warmup_ratio=finetune.get("warmup_ratio", 0.1),
                                trainable_layers=finetune.get("trainable_layers"))
    # max_epochs (paper recipes count epochs) ends it unless max_steps (-1: no cap) comes first.
    trainer = make_trainer(trainer_cfg, work_dir, max_steps=finetune["max_steps"],
                           max_epochs=finetune.get("max_epochs"), limit_val_batches=0,
                           enable_checkpointing=False, num_sanity_val_steps=0,
                           val_check_interval=None)
    model.train()
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    model.requires_grad_(True)


def prepare_teacher(cfg, task: TaskSpec, tokenizer, cache_dir: Path, resolve) -> Teacher:
    label_words = uses_label_words(cfg.pair)
    spec = _plain(cfg.pair.teacher) | ({"classify_with": "label_words"} if label_words else {})
    ft = _plain(cfg.teacher_finetune)
    finetune = ft if ft.get("enabled") else None
    key = teacher_key(spec, task, finetune)
    entry = cache_dir / "teachers" / key
    start = time.perf_counter()

    if _valid_entry(entry, key):
        try:
            model = (apply_final_norm_state(load_saved_model(entry / "model")[0], spec)
                     if finetune is not None else
                     build_model(spec, task.format, tokenizer, task.label_names, resolve,
                                 seed=spec.get("init_seed", 0), label_words=label_words))
            metrics = json.loads((entry / "metrics.json").read_text())
            log.info("teacher: cache hit %s", entry)
            return Teacher(model, key, metrics, {"cache_hit": True, "key": key,
                                                 "path": str(entry),
                                                 "seconds": time.perf_counter() - start})
        except Exception as e:  # noqa: BLE001  (any unloadable entry is rebuilt, never trusted)
            log.warning("teacher cache entry %s does not load (%s: %s)", entry,
                        type(e).__name__, e)
    if entry.exists():
        log.warning("teacher cache entry %s is incomplete or corrupt; rebuilding it", entry)

    model = build_model(spec, task.format, tokenizer, task.label_names, resolve,
                        seed=spec.get("init_seed", 0), label_words=label_words)
    finetune_seconds = 0.0
    if finetune is not None:
        log.info("teacher: fine-tuning %s on %s for %d steps", spec.get("name"), task.name,
                 finetune["max_steps"])
        t0 = time.perf_counter()
        finetune_teacher(model, task, tokenizer, finetune, cfg.trainer, cache_dir / "tmp",
                         label_words)
        finetune_seconds = time.perf_counter() - t0
    eval_data = DistillDataModule(task, tokenizer, eval_batch_size=cfg.data.eval_batch_size,
                                  label_words=label_words)
    device = runtime_device(cfg.trainer)
    label_ids = single_token_label_ids(model, tokenizer, task)
    with autocast(cfg.trainer, device):
        metrics = {split: evaluate_model(model.to(device), loader, desc=f"teacher {split}",
                                         label_ids=label_ids)
                   for split, loader in (("validation", eval_data.val_dataloader()),
                                         ("test", eval_data.test_dataloader()))}

    def fill(tmp: Path) -> None:
        if finetune is not None:
            save_model(model, tokenizer, tmp / "model")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / MARKER).write_text(json.dumps({"key": key, "spec": spec, "finetune": finetune,
                                              "finetune_seconds": finetune_seconds,
                                              "files": file_manifest(tmp)}, indent=2))

    atomic_directory(entry, fill)
    return Teacher(model, key, metrics, {"cache_hit": False, "key": key, "path": str(entry),
                                         "finetune_seconds": finetune_seconds,
                                         "seconds": time.perf_counter() - start})


def evaluate_teacher(teacher: Teacher, tokenizer, task: TaskSpec, eval_cfg) -> dict:
    """The teacher's test report; lm-eval scores are cached in its cache entry per settings,
    so a sweep scores each teacher once."""
    from flexkd.evaluation.evaluate import evaluate_on_task, lm_eval_settings, uses_lm_eval
    from flexkd.storage import atomic_write_json

    harness = teacher.metrics.get("test", {})
    if not uses_lm_eval(teacher.model, eval_cfg):
        return {"metrics": harness, "samples": [], "settings": {}}
    settings = lm_eval_settings(eval_cfg, task).__dict__ | {"tasks": list(eval_cfg.tasks)}
    path = Path(teacher.info["path"]) / f"eval-{content_hash(settings)}.json"
    try:
        report = json.loads(path.read_text())
        log.info("teacher lm-eval: cache hit %s", path)
        return report
    except (OSError, ValueError):
        pass
    report = evaluate_on_task(teacher.model, tokenizer, task, None, eval_cfg, who="teacher",
                              harness_metrics=harness)
    atomic_write_json(path, report)
    return report
