"""Healing a pruned causal student before distillation (`pair.student.heal`).

A student cut from its teacher starts far from any language model (SmolLM2-135M cut to d 288
and 15 blocks: validation response perplexity 705,369), and an instruction task's loss only
reaches the few response tokens of each example (a headline: ~15 of ~150), so distillation
spends its steps relearning the language. Minitron and Sheared-LLaMA retrain a pruned model on
plain text first; here that is a short pass of next-token loss on *every* token of the task's
training text (prompt and response), with the same Lightning loop as the teacher fine-tune.
Every strategy then starts from the same healed student, so the comparison stays paired.

The healed weights are a cache entry keyed by the student's weights, the healing settings,
the task data, the batch size and the precision: a sweep heals each student once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from flexkd.cache import get_or_build
from flexkd.errors import ConfigError
from flexkd.evaluation.harness_metrics import evaluate_model
from flexkd.models import IGNORE_INDEX, CausalLM, TaskModel, load_saved_model, save_model
from flexkd.pruning import tensors_fingerprint
from flexkd.training import autocast, precision_key, runtime_device

log = logging.getLogger(__name__)

CACHE_KIND = "healed"
CACHE_VERSION = 1


class WholeTextLM(CausalLM):
    """A causal LM whose loss is next-token cross-entropy on every non-padding token, prompt
    included (CausalLM's own loss reads the response only). Shares the given backbone."""

    def forward(self, inputs, layers=(), all_logits: bool = False):
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        return super().forward({**inputs, "labels": labels}, layers, all_logits)


def heal_settings(student_spec: dict) -> dict | None:
    """The spec's `heal` mapping when it asks for at least one step, else None."""
    heal = dict(student_spec.get("heal") or {})
    return heal if heal.get("steps", 0) > 0 else None


def healed_student(student: TaskModel, heal: dict, data, tokenizer, trainer_cfg,
                   cache_dir: Path, attention: str | None = None) -> tuple[TaskModel, dict]:
    """`student` after `heal["steps"]` steps of whole-text next-token training on `data`'s
    training split (from the cache when this student was healed so before), and the record
    for results.json (settings, validation metrics before and after, seconds, cache entry)."""
    from flexkd.teacher import finetune_teacher

    if not isinstance(student, CausalLM):
        raise ConfigError("pair.student.heal trains a causal LM on the task's text; this student "
                          f"is a {student.kind} (an encoder with a classification head): drop heal")
    key_obj = {"weights": tensors_fingerprint(student.state_dict().values()), "heal": heal,
               "task": data.task.fingerprint(), "batch_size": data.batch_size,
               "precision": precision_key(trainer_cfg)}
    if attention:  # a chosen kernel rounds differently; entries of the default stay valid
        key_obj["attention"] = attention
    pruning = getattr(student.backbone, "flexkd_pruning", None)

    def validation(model: TaskModel) -> dict:
        model.to(runtime_device(trainer_cfg))
        with torch.random.fork_rng(), autocast(trainer_cfg, runtime_device(trainer_cfg)):
            return evaluate_model(model, data.val_dataloader(), desc="student validation")

    def build(out: Path) -> dict:
        before = validation(student)
        start = time.perf_counter()
        log.info("healing the student: %d steps of next-token loss on every training token",
                 heal["steps"])
        finetune_teacher(WholeTextLM(student.backbone), data,
                         {**heal, "max_steps": heal["steps"], "trainable_layers": None},
                         trainer_cfg, cache_dir / "tmp", progress="healing")
        seconds = round(time.perf_counter() - start, 3)
        save_model(student, tokenizer, out / "model")
        record = {"validation_before": before, "validation_after": validation(student),
                  "seconds": seconds}
        (out / "record.json").write_text(json.dumps(record, indent=2))
        return record

    def load(path: Path) -> tuple[TaskModel, dict]:
        model = load_saved_model(path / "model", attention)[0].use_final_norm_state(student.final_norm_state)
        return model, json.loads((path / "record.json").read_text())

    (model, record), entry = get_or_build(cache_dir, CACHE_KIND, key_obj, build, load,
                                          version=CACHE_VERSION, desc="healed student")
    if pruning is not None:
        model.backbone.flexkd_pruning = pruning
    return model, {"settings": heal, **record, "path": str(entry.path), "cache_hit": entry.cache_hit}
