"""Which student checkpoint is kept: the last one, or the one with the best validation ROUGE-L.

MiniLLM's protocol picks the final checkpoint of an instruction-following student by ROUGE-L
on the validation split. With `eval.select_checkpoint=best_val_rougeL` a callback scores the
student every `eval.val_every_n_steps` optimizer steps and at the end of training (greedy
generation through the lm-eval bridge, the test settings' stops and token budget, on
`eval.val_limit` validation examples), keeps a CPU copy of the best weights and loads them
back when training ends, so everything after (test scores, the saved student) uses them.
The choice and every validation score go to results.json (`checkpoint_selection`).
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.models import TaskModel

log = logging.getLogger(__name__)

SELECTIONS = ("last", "best_val_rougeL")


class BestValidationRouge(L.Callback):
    """Keep the student weights with the highest validation ROUGE-L (ties: the earlier step)."""

    def __init__(self, model: TaskModel, tokenizer, task: TaskSpec, eval_cfg, every_n_steps: int,
                 limit: int | None = None):
        if every_n_steps < 1:
            raise ConfigError(f"eval.val_every_n_steps={every_n_steps} must be >= 1")
        self.model, self.tokenizer, self.task, self.eval_cfg = model, tokenizer, task, eval_cfg
        self.every_n_steps, self.limit = int(every_n_steps), limit
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ scoring
    def score(self) -> float:
        """Greedy validation ROUGE-L of the model as it is now."""
        from flexkd.evaluation.evaluate import context_window, lm_eval_settings
        from flexkd.evaluation.lm_eval_bridge import LmEvalTask, evaluate_causal_lm

        settings = lm_eval_settings(self.eval_cfg, self.task)
        settings.sampling, settings.perplexity = False, False
        settings.limit = self.limit or self.task.max_examples.get("validation")
        if settings.max_length is None:
            settings.max_length = context_window(settings, self.task, self.model.backbone)
        lm_task = LmEvalTask(self.task.name, "instruction", str(self.task.data_dir), "validation",
                             None, self.task.max_prompt_words, self.task.prompt_template)
        with torch.no_grad():
            report = evaluate_causal_lm(self.model.backbone, self.tokenizer, lm_task, settings)
        return float(report["metrics"]["rougeL"])

    def consider(self, step: int) -> None:
        """Score the current weights at `step`; keep a copy when they are the best so far."""
        if self.history and self.history[-1]["step"] == step:
            return
        value = self.score()
        self.history.append({"step": int(step), "rougeL": value})
        log.info("checkpoint selection: step %d validation rougeL %.4f", step, value)
        if self.best is None or value > self.best["rougeL"]:
            self.best = {"step": int(step), "rougeL": value}
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step > 0 and step % self.every_n_steps == 0:
            self.consider(step)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.consider(trainer.global_step)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            log.info("checkpoint selection: kept step %d (validation rougeL %.4f)",
                     self.best["step"], self.best["rougeL"])

    # The best weights travel in the training checkpoint, so a resumed run keeps them.
    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history") or [])
        self.best = state_dict.get("best")
        self.best_state = state_dict.get("best_state")

    def summary(self) -> dict:
        return {"select_checkpoint": "best_val_rougeL", "val_every_n_steps": self.every_n_steps,
                "val_limit": self.limit, "history": list(self.history),
                "best_step": self.best["step"] if self.best else None,
                "best_val_rougeL": self.best["rougeL"] if self.best else None}


def checkpoint_selection(eval_cfg, model: TaskModel, tokenizer, task: TaskSpec) -> BestValidationRouge | None:
    """The callback `eval.select_checkpoint` asks for (None: keep the last weights)."""
    choice = eval_cfg.get("select_checkpoint") or "last"
    if choice not in SELECTIONS:
        raise ConfigError(f"eval.select_checkpoint={choice!r} is not one of: {', '.join(SELECTIONS)}")
    if choice == "last":
        return None
    if task.format != "instruction" or model.kind != "causal_lm":
        raise ConfigError("eval.select_checkpoint=best_val_rougeL scores generated answers: it "
                          "needs an instruction task (e.g. task=bbc_headline); use last")
    return BestValidationRouge(model, tokenizer, task, eval_cfg,
                               int(eval_cfg.get("val_every_n_steps") or 50),
                               eval_cfg.get("val_limit"))


def selection_summary(trainer) -> dict:
    """results.json's `checkpoint_selection` for a finished trainer."""
    for callback in trainer.callbacks:
        if isinstance(callback, BestValidationRouge):
            return callback.summary()
    return {"select_checkpoint": "last"}
