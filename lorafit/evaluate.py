"""Scoring a classifier on a tokenized split: loss, accuracy, macro-F1, per-class scores, confusion matrix."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from lorafit.data import TokenizedSplit, collate, default_pad_multiple, eval_order


@dataclass
class Predictions:
    """Per-example outputs in the split's original order."""

    labels: torch.Tensor  # (N,)
    probs: torch.Tensor  # (N, num_labels)
    loss: float  # mean cross-entropy

    @property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(dim=-1)


def classification_metrics(labels: torch.Tensor, predicted: torch.Tensor, loss: float) -> dict[str, float]:
    y_true, y_pred = labels.tolist(), predicted.tolist()
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def classification_report(labels: torch.Tensor, predicted: torch.Tensor, loss: float, names: list[str]) -> dict:
    """`classification_metrics` plus per-class scores and the confusion matrix.

    Returns {"loss", "accuracy", "macro_f1", "per_class": {name: {"precision", "recall", "f1",
    "support"}}, "confusion_matrix": rows = true class, columns = predicted class, in `names`
    order}. A class with no predictions (or no examples) scores 0 precision (recall), not NaN.
    macro_f1 is computed as training logs it: the mean F1 over the classes that occur in `labels`
    or `predicted`, so it can differ from the mean of `per_class` when a class never occurs.
    """
    y_true, y_pred = labels.tolist(), predicted.tolist()
    classes = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                                     zero_division=0)
    return {
        **classification_metrics(labels, predicted, loss),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


@torch.inference_mode()
def predict(model, split: TokenizedSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
            autocast=nullcontext, on_batch=None) -> Predictions:
    """Run `model` over `split` in length-sorted batches; `on_batch(n)` reports progress."""
    was_training = model.training
    model.eval()
    n = len(split)
    probs: torch.Tensor | None = None
    total_loss = 0.0
    multiple, cap = default_pad_multiple(device), max(split.lengths, default=0)
    for indices in eval_order(split.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(split, indices, pad_id, multiple, cap).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        if probs is None:
            probs = torch.empty(n, logits.shape[-1])
        probs[torch.tensor(indices)] = logits.softmax(-1).cpu()
        if on_batch:
            on_batch(len(indices))
    model.train(was_training)
    return Predictions(torch.tensor(split.labels), probs, total_loss / max(n, 1))


def evaluate(model, split: TokenizedSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
             autocast=nullcontext, on_batch=None) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of `model` on `split`."""
    out = predict(model, split, batch_size, pad_id, device, autocast, on_batch)
    return classification_metrics(out.labels, out.predicted, out.loss)


@torch.inference_mode()
def evaluate_lm(model, split, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                autocast=nullcontext, on_batch=None) -> dict[str, float]:
    """Mean next-token loss over the labelled tokens of `split` (an `lm.LMSplit`), and its perplexity."""
    from lorafit.lm import collate_lm, count_targets, lm_loss

    was_training = model.training
    model.eval()
    total_loss, total_targets = 0.0, 0
    multiple, cap = default_pad_multiple(device), max(split.lengths, default=0)
    for indices in eval_order(split.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate_lm(split, indices, pad_id, multiple, cap).items()}
        with autocast():
            total_loss += lm_loss(model, batch).item()
        total_targets += count_targets(batch)
        if on_batch:
            on_batch(len(indices))
    model.train(was_training)
    loss = total_loss / max(total_targets, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_targets}
