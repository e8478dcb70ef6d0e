"""The harness's own metrics: classifier accuracy/F1/MCC and response-token perplexity."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_matthews_corrcoef,
)
from tqdm.auto import tqdm

from flexkd.models import TaskModel


@torch.no_grad()
def evaluate_model(model: TaskModel, loader, side: str = "student", desc: str = "evaluate") -> dict:
    """Metrics of `model` on a loader of harness batches, reading the given tokenizer side."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    nll, tokens = 0.0, 0
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            inputs = {k: v.to(device) for k, v in batch[side].items()}
            out = model(inputs)
            if model.kind == "classifier":
                preds.append(out.logits.argmax(-1).cpu())
                labels.append(inputs["labels"].cpu())
            else:
                n = int((inputs["labels"][:, 1:] != -100).sum())
                nll += float(out.loss) * n
                tokens += n
    finally:
        model.train(was_training)
    if model.kind == "classifier":
        p, y = torch.cat(preds), torch.cat(labels)
        c = model.num_outputs
        return {
            "accuracy": float(multiclass_accuracy(p, y, c, average="micro")),
            "macro_f1": float(multiclass_f1_score(p, y, c, average="macro")),
            "mcc": float(multiclass_matthews_corrcoef(p, y, c)),
            "examples": int(y.numel()),
        }
    mean_nll = nll / max(tokens, 1)
    return {"loss": mean_nll, "perplexity": math.exp(min(mean_nll, 50.0)), "tokens": tokens}
