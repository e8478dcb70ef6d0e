"""The harness's own metrics: classifier accuracy/F1/MCC and response-token perplexity."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_matthews_corrcoef,
)

from flexkd.models import IGNORE_INDEX, TaskModel, response_positions
from flexkd.progress import progress


def label_word_predictions(kd_logits: torch.Tensor, labels: torch.Tensor,
                           label_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, gold) class indices of causal-LM classification with one-token label words:
    the argmax over the label tokens at the position that predicts the label.

    `kd_logits` are the model's (N, V) response rows (`ModelOutputs.kd_logits`), row-major over
    (example, position): an example's first row is the position that predicts its label."""
    positions = response_positions(labels)
    per_example = positions.sum(1)
    if not bool((per_example > 0).all()):
        raise ValueError("label-word scoring: an example has no label token (truncated away?)")
    first_row = torch.cumsum(per_example, 0) - per_example
    rows = torch.arange(labels.shape[0], device=labels.device)
    candidates = torch.tensor(label_ids, device=kd_logits.device)
    pred = kd_logits[first_row][:, candidates].argmax(-1)
    gold_token = labels[rows, positions.int().argmax(1) + 1]
    gold = (gold_token.unsqueeze(-1) == candidates).int().argmax(-1)
    return pred, gold


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> dict:
    return {
        "accuracy": float(multiclass_accuracy(pred, gold, classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(pred, gold, classes, average="macro")),
        "mcc": float(multiclass_matthews_corrcoef(pred, gold, classes)),
        "examples": int(gold.numel()),
    }


@torch.no_grad()
def evaluate_model(model: TaskModel, loader, side: str = "student", desc: str = "evaluate",
                   label_ids: list[int] | None = None) -> dict:
    """Metrics of `model` on a loader of harness batches, reading the given tokenizer side.

    Classifier heads: accuracy, macro-F1, MCC. Causal LMs: loss and perplexity of the target
    tokens, plus the classification metrics when `label_ids` (one token per label word) are
    given for a classification task."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, golds = [], []
    nll, tokens = 0.0, 0
    try:
        for batch in progress(loader, desc):
            inputs = {k: v.to(device) for k, v in batch[side].items()}
            out = model(inputs)
            if model.kind == "classifier":
                preds.append(out.logits.argmax(-1).cpu())
                golds.append(inputs["labels"].cpu())
                continue
            n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            nll += float(out.loss) * n
            tokens += n
            if label_ids:
                pred, gold = label_word_predictions(out.kd_logits, inputs["labels"], label_ids)
                preds.append(pred.cpu())
                golds.append(gold.cpu())
    finally:
        model.train(was_training)
    metrics = {}
    if model.kind != "classifier":
        mean_nll = nll / max(tokens, 1)
        metrics = {"loss": mean_nll, "perplexity": math.exp(min(mean_nll, 50.0)), "tokens": tokens}
    if preds:
        classes = model.num_outputs if model.kind == "classifier" else len(label_ids)
        metrics.update(classification_metrics(torch.cat(preds), torch.cat(golds), classes))
    return metrics
