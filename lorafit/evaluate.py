"""Scoring a classifier on a tokenized split."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from lorafit.data import TokenizedSplit, collate, eval_order


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


@torch.inference_mode()
def predict(model, split: TokenizedSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
            autocast=nullcontext, on_batch=None) -> Predictions:
    """Run `model` over `split` in length-sorted batches; `on_batch(n)` reports progress."""
    was_training = model.training
    model.eval()
    n = len(split)
    probs: torch.Tensor | None = None
    total_loss = 0.0
    for indices in eval_order(split.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(split, indices, pad_id).items()}
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
