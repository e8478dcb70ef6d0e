"""Stage 2 of a run: the teacher, fine-tuned on the task when asked, cached by content hash.

The fine-tune is the distillation stage without a teacher: the same DistillDataModule, the
same DistillationModule with the base `Strategy()` (its defaults keep the task loss alone),
the same `make_trainer`, and the harness metrics of `evaluate_model`, as for the student. The
result lives in a `flexkd.cache` entry keyed by (teacher spec, task data, fine-tune settings,
precision), so a sweep over strategies and seeds fine-tunes and evaluates each teacher once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from flexkd.cache import get_or_build
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.tasks import TaskSpec
from flexkd.evaluation.evaluate import single_token_label_ids
from flexkd.evaluation.harness_metrics import evaluate_model
from flexkd.models import TaskModel, apply_final_norm_state, build_model, load_saved_model, save_model
from flexkd.storage import content_hash
from flexkd.training import autocast, make_trainer, precision_key, runtime_device

log = logging.getLogger(__name__)

CACHE_KIND = "teachers"
CACHE_VERSION = 2  # 2: flexkd.cache entries
OPTIM_KEYS = ("lr", "weight_decay", "warmup_ratio", "trainable_layers")


@dataclass
class Teacher:
    model: TaskModel
    fingerprint: str
    metrics: dict
    info: dict = field(default_factory=dict)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def finetune_teacher(model: TaskModel, data: DistillDataModule, finetune: dict, trainer_cfg,
                     work_dir: Path, progress: str = "teacher fine-tune") -> None:
    """Train the teacher on the task with the task loss alone: distillation with no teacher.
    (flexkd.healing trains a student with it too; `progress` names the loop in the logs.)"""
    import lightning as L

    from flexkd.module import DistillationModule
    from flexkd.strategies.base import Strategy

    L.seed_everything(finetune.get("seed", 0), workers=True, verbose=False)
    module = DistillationModule(model, Strategy(), teacher=None,
                                **{k: finetune[k] for k in OPTIM_KEYS if k in finetune})
    trainer = make_trainer(trainer_cfg, work_dir, progress=progress,
                           max_steps=finetune["max_steps"],
                           max_epochs=finetune.get("max_epochs"), limit_val_batches=0,
                           enable_checkpointing=False, num_sanity_val_steps=0,
                           val_check_interval=None)
    model.train()
    trainer.fit(module, datamodule=data)


def prepare_teacher(spec, finetune, trainer_cfg, task: TaskSpec, tokenizer, cache_dir: Path,
                    resolve, *, eval_batch_size: int, label_words: bool = False) -> Teacher:
    """The teacher for `task`: `spec` (pair.teacher) built, fine-tuned per `finetune` (the
    teacher_finetune section; not when its `enabled` is false) under `trainer_cfg`, and scored
    on the validation and test splits; from the cache when an entry for these settings exists.
    `label_words`: a causal teacher classifies by writing the label's name."""
    spec = _plain(spec) | ({"classify_with": "label_words"} if label_words else {})
    finetune = _plain(finetune)
    finetune = finetune if finetune.get("enabled") else None
    # The precision the fine-tune and the scoring ran in: the same recipe under bf16 and fp32
    # gives two different teachers, and everything keyed by the teacher's fingerprint (probe,
    # store, pruned students) follows it.
    key_obj = {"spec": spec, "task": task.fingerprint(), "finetune": finetune,
               "precision": precision_key(trainer_cfg)}

    def fresh_model() -> TaskModel:
        return build_model(spec, task.format, tokenizer, task.label_names, resolve,
                           seed=spec.get("init_seed", 0), label_words=label_words)

    def build(out: Path) -> dict:
        model = fresh_model()
        data = DistillDataModule(task, tokenizer, batch_size=(finetune or {}).get("batch_size", 1),
                                 eval_batch_size=eval_batch_size, seed=(finetune or {}).get("seed", 0),
                                 label_words=label_words)
        finetune_seconds = 0.0
        if finetune is not None:
            log.info("teacher: fine-tuning %s on %s for %d steps", spec.get("name"), task.name,
                     finetune["max_steps"])
            start = time.perf_counter()
            finetune_teacher(model, data, finetune, trainer_cfg, cache_dir / "tmp")
            finetune_seconds = round(time.perf_counter() - start, 3)
            save_model(model, tokenizer, out / "model")
        data.setup()
        device = runtime_device(trainer_cfg)
        label_ids = single_token_label_ids(model, tokenizer, task)
        with autocast(trainer_cfg, device):
            metrics = {split: evaluate_model(model.to(device), loader, desc=f"teacher {split}",
                                             label_ids=label_ids)
                       for split, loader in (("validation", data.val_dataloader()),
                                             ("test", data.test_dataloader()))}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return {"finetune_seconds": finetune_seconds}

    def load(path: Path) -> tuple[TaskModel, dict]:
        kernel = spec.get("attn_implementation")
        model = (apply_final_norm_state(load_saved_model(path / "model", kernel)[0], spec)
                 if finetune is not None else fresh_model())
        return model, json.loads((path / "metrics.json").read_text())

    (model, metrics), entry = get_or_build(cache_dir, CACHE_KIND, key_obj, build, load,
                                           version=CACHE_VERSION, desc="teacher")
    log.info("teacher: %s %s", "cache hit" if entry.cache_hit else "built", entry.path)
    info = entry.as_dict() | ({} if entry.cache_hit else entry.info)  # + this build's seconds
    return Teacher(model, entry.key, metrics, info)


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
