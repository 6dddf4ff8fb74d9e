"""`model.task: sequence-classification`: one label per text.

Data: a text column and a label column (names or integers; label ids follow the train split's
sorted names, or a `ClassLabel`'s order), or 20 Newsgroups. The loss is cross-entropy over
examples (with the recipe's `train.label_smoothing`); evaluation gives loss, accuracy and
macro-F1, `lorafit eval` adds per-class scores and the confusion matrix, and `lorafit predict`
gives each text's most probable label and every label's probability.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafit.cache import cache_key, load_tokens, save_tokens, tokenizer_fingerprint
from lorafit.data import (NEWSGROUPS, TextSplit, default_pad_multiple, eval_order, get_split, hold_out,
                          load_newsgroups, open_hf, padded_width, split_source)
from lorafit.distributed import merge_rows
from lorafit.errors import LorafitError
from lorafit.recipe import DataConfig
from lorafit.tasks.base import Task, TaskData


@dataclass
class TokenizedSplit:
    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


# ---------------------------------------------------------------- loading


def _load_hf(cfg: DataConfig) -> tuple[dict[str, TextSplit], list[str] | None]:
    import datasets

    dataset = open_hf(cfg)
    splits: dict[str, TextSplit] = {}
    names: list[str] | None = None
    for split in (cfg.train_split, cfg.eval_split, cfg.test_split):
        if not split or split in splits:
            continue
        part = get_split(dataset, split, {"text_column": cfg.text_column, "label_column": cfg.label_column})
        feature = part.features[cfg.label_column]
        labels = list(part[cfg.label_column])
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
            labels = [names[i] for i in labels]
        splits[split] = TextSplit(list(part[cfg.text_column]), labels)
    return splits, names


def _label_names(values: list[Any], where: str) -> list[str]:
    """Label names in id order: sorted unique values (numbers numerically, strings as text)."""
    kinds = {type(v) for v in values}
    if kinds <= {int} or kinds <= {str}:
        return [str(v) for v in sorted(set(values))]
    raise LorafitError(f"data.label_column: labels in {where} must be all integers or all strings, found {sorted(k.__name__ for k in kinds)}")


def _check_texts(split: TextSplit, name: str, source: str) -> None:
    """Every text of split `name` (read from `source`) is a string, and not every one is empty."""
    if not split.texts:
        raise LorafitError(f"data: split {name!r} is empty: {source} has no rows")
    bad = next((i for i, t in enumerate(split.texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise LorafitError(f"data.text_column: row {bad} of split {name!r} is {split.texts[bad]!r}, not a string")
    if not any(t.strip() for t in split.texts):
        raise LorafitError(f"data: split {name!r} has no text: data.text_column is empty in every row of {source}")


def load_classification_data(cfg: DataConfig, seed: int) -> TaskData:
    """Load the recipe's splits; labels become ids in `labels` order, known to the train split."""
    splits, names = load_newsgroups(cfg) if cfg.path == NEWSGROUPS else _load_hf(cfg)
    train = splits[cfg.train_split]
    _check_texts(train, cfg.train_split, split_source(cfg, cfg.train_split))
    if cfg.eval_split:
        eval_ = splits[cfg.eval_split]
    else:
        keep, held = hold_out(len(train.texts), cfg.eval_fraction, seed, stratify=train.labels)
        train, eval_ = train.pick(keep), train.pick(held)
    test = splits.get(cfg.test_split) if cfg.test_split else None
    if cfg.max_train_samples:
        train = TextSplit(train.texts[: cfg.max_train_samples], train.labels[: cfg.max_train_samples])
    if cfg.max_eval_samples:
        eval_ = TextSplit(eval_.texts[: cfg.max_eval_samples], eval_.labels[: cfg.max_eval_samples])
        if test is not None:
            test = TextSplit(test.texts[: cfg.max_eval_samples], test.labels[: cfg.max_eval_samples])
    labels = names or _label_names(train.labels, f"split {cfg.train_split!r}")
    index = {name: i for i, name in enumerate(labels)}
    checks = [(cfg.eval_split or "eval", eval_, split_source(cfg, cfg.eval_split) if cfg.eval_split
               else f"the part of {split_source(cfg, cfg.train_split)} held out for eval")]
    if test is not None:
        checks.append((cfg.test_split, test, split_source(cfg, cfg.test_split)))
    for split_name, split, source in checks:
        _check_texts(split, split_name, source)
        unseen = sorted({str(v) for v in split.labels} - set(index))
        if unseen:
            raise LorafitError(f"data: the {split_name} split has labels the train split lacks: {unseen[:5]}")
    encode = lambda split: None if split is None else TextSplit(split.texts, [index[str(v)] for v in split.labels])  # noqa: E731
    return TaskData(encode(train), encode(eval_), encode(test), labels)


def load_labelled_split(cfg: DataConfig, split: str, labels: list[str], max_samples: int | None = None) -> TextSplit:
    """One split of the dataset `cfg` names, its labels mapped to ids in the order of `labels`.

    For scoring a trained model: `labels` are the model's label names, so ids mean what they
    meant in training. Only `split` is loaded (no train split, no hold-out); `max_samples` keeps
    the first N examples, as `data.max_eval_samples` does for the test split in training.
    Raises `LorafitError` when the split is missing or has a label the model does not know.
    """
    only = dataclasses.replace(cfg, train_split=split, eval_split=None, test_split=None)
    splits, _ = load_newsgroups(only) if cfg.path == NEWSGROUPS else _load_hf(only)
    part = splits[split]
    if max_samples:
        part = TextSplit(part.texts[:max_samples], part.labels[:max_samples])
    _check_texts(part, split, split_source(cfg, split))
    index = {name: i for i, name in enumerate(labels)}
    if labels == [f"LABEL_{i}" for i in range(len(labels))]:
        # A model without label names (e.g. from a PEFT adapter): integer labels are the ids.
        index.update({str(i): i for i in range(len(labels))})
    unknown = sorted({str(v) for v in part.labels} - set(index))
    if unknown:
        raise LorafitError(f"data: split {split!r} has labels the model does not know: {unknown[:5]}; "
                           f"the model's labels are {labels[:10]}")
    return TextSplit(part.texts, [index[str(v)] for v in part.labels])


# ---------------------------------------------------------------- tokenizing and batching


def tokenize(split: TextSplit, tokenizer, max_length: int, cache: bool = False) -> TokenizedSplit:
    """Token ids of `split`'s texts, truncated to `max_length`; the labels are passed through.

    With `cache`, the ids are read from the tokenization cache (`lorafit.cache`) when the same
    tokenizer has tokenized the same texts at this `max_length` before, and stored there otherwise.
    """
    key = None
    if cache:
        params = {"kind": "classification", "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length}
        key = cache_key(params, split.texts)
        entry = load_tokens(key, ["input_ids"])
        if entry is not None:
            return TokenizedSplit(entry[0]["input_ids"], list(split.labels))
    input_ids = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    if key is not None:
        save_tokens(key, {"input_ids": input_ids}, {})
    return TokenizedSplit(input_ids, list(split.labels))


def collate(split: TokenizedSplit, indices: list[int], pad_id: int, multiple: int = 1,
            cap: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest of them (rounded up to `multiple`, at most `cap`):
    input_ids, attention_mask, labels."""
    rows = [split.input_ids[i] for i in indices]
    width = padded_width([len(r) for r in rows], multiple, cap)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------- scoring


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
    from sklearn.metrics import accuracy_score, f1_score

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
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

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
def score_examples(model, split: TokenizedSplit, indices: list[int], batch_size: int, pad_id: int,
                   device: torch.device | str = "cpu", autocast=nullcontext, on_batch=None) -> dict[str, torch.Tensor]:
    """Run `model` over the examples `indices` of `split` in length-sorted batches; `on_batch(n)`
    reports progress. Returns per-example rows, in `indices` order: "probs" (n, num_labels) and
    "loss" (n,), the cross-entropy of each example."""
    was_training = model.training
    model.eval()
    probs: torch.Tensor | None = None
    losses = torch.empty(len(indices))
    multiple, cap = default_pad_multiple(device), max(split.lengths, default=0)
    for rows in eval_order([split.lengths[i] for i in indices], batch_size):
        chosen = [indices[r] for r in rows]
        batch = {k: v.to(device) for k, v in collate(split, chosen, pad_id, multiple, cap).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        if probs is None:
            probs = torch.empty(len(indices), logits.shape[-1])
        probs[rows] = logits.softmax(-1).cpu()
        losses[rows] = F.cross_entropy(logits, batch["labels"], reduction="none").cpu()
        if on_batch:
            on_batch(len(rows))
    model.train(was_training)
    return {"probs": probs if probs is not None else torch.empty(0, 0), "loss": losses}


def predictions(split: TokenizedSplit, rows: dict[str, torch.Tensor]) -> Predictions:
    """`Predictions` from the `score_examples` rows of every example of `split`, in order."""
    return Predictions(torch.tensor(split.labels), rows["probs"], rows["loss"].sum().item() / max(len(split), 1))


def predict(model, split: TokenizedSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
            autocast=nullcontext, on_batch=None) -> Predictions:
    """Run `model` over `split` in length-sorted batches; `on_batch(n)` reports progress."""
    every = list(range(len(split)))
    return predictions(split, score_examples(model, split, every, batch_size, pad_id, device, autocast, on_batch))


def predict_texts(trained, texts: list[str], console=None) -> list[dict]:
    """For each text, in order: {"text", "label" (the most probable), "score" (its probability),
    "probs" ({label: probability} for every label)}, from a loaded `inference.TrainedModel`."""
    from lorafit.inference import progress_bar, runtime

    # Labels are unknown: predict's loss over these placeholder ids is meaningless and ignored.
    tokens = tokenize(TextSplit(texts, [0] * len(texts)), trained.tokenizer, trained.max_length)
    run = runtime(trained)
    with progress_bar(console, "predict", len(tokens)) as advance:
        out = predict(trained.model, tokens, run.batch_size, trained.tokenizer.pad_token_id, run.device,
                      run.autocast, on_batch=advance)
    rows = []
    for text, probs in zip(texts, out.probs.tolist()):
        top = max(range(len(probs)), key=probs.__getitem__)
        rows.append({"text": text, "label": trained.labels[top], "score": probs[top],
                     "probs": dict(zip(trained.labels, probs))})
    return rows


# ---------------------------------------------------------------- the task


class SequenceClassification(Task):
    name = "sequence-classification"
    peft_task_type = "SEQ_CLS"
    auto_class = "AutoModelForSequenceClassification"
    peft_head_modules = ("classifier", "score")
    labels_text = True
    train_keys = ("label_smoothing",)
    eval_metrics = ("accuracy", "macro_f1")

    def model_kwargs(self, labels: list[str] | None) -> dict:
        if not labels:
            raise LorafitError("sequence classification needs at least one label")
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def claims(self, config: dict) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])

    def load_data(self, cfg, seed: int) -> TaskData:
        return load_classification_data(cfg, seed)

    def load_split(self, cfg, split: str, labels: list[str] | None, max_samples: int | None = None) -> TextSplit:
        return load_labelled_split(cfg, split, labels, max_samples)

    def tokenize(self, examples: TextSplit, tokenizer, cfg, max_length: int, train: bool = False) -> TokenizedSplit:
        return tokenize(examples, tokenizer, max_length, cache=cfg.cache)

    def collate(self, split: TokenizedSplit, indices: list[int], pad_id: int, multiple: int = 1,
                cap: int | None = None) -> dict[str, torch.Tensor]:
        return collate(split, indices, pad_id, multiple, cap)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def loss(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum", label_smoothing=label_smoothing)

    def evaluate(self, model, split: TokenizedSplit, batch_size: int, pad_id: int,
                 device: torch.device | str = "cpu", autocast: Callable = nullcontext,
                 on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of `model` on `split`."""
        out = predict(model, split, batch_size, pad_id, device, autocast, on_batch)
        return classification_metrics(out.labels, out.predicted, out.loss)

    def evaluate_share(self, model, split: TokenizedSplit, indices: list[int], batch_size: int, pad_id: int,
                       device: torch.device | str = "cpu", autocast: Callable = nullcontext) -> tuple:
        """The examples' indices and their `score_examples` rows."""
        return indices, score_examples(model, split, indices, batch_size, pad_id, device, autocast)

    def reduce_eval(self, split: TokenizedSplit, shares: list[tuple]) -> dict[str, float]:
        out = predictions(split, merge_rows(shares, len(split)))
        return classification_metrics(out.labels, out.predicted, out.loss)

    def probe_batch(self, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        from lorafit.merge import text_probe_batch

        return text_probe_batch(tokenizer, max_length)

    def eval_report(self, trained, examples: TextSplit, split: str, batch_size: int, device: torch.device,
                    autocast: Callable, console) -> dict:
        """Examples scored, the label names, loss, accuracy, macro-F1, per-class precision/recall/F1/support
        and the confusion matrix (`classification_report`)."""
        from lorafit.inference import progress_bar

        tokens = tokenize(examples, trained.tokenizer, trained.max_length)
        with progress_bar(console, f"eval {split}", len(tokens)) as advance:
            out = predict(trained.model, tokens, batch_size, trained.tokenizer.pad_token_id, device, autocast,
                          on_batch=advance)
        return {"examples": len(tokens), "labels": trained.labels,
                **classification_report(out.labels, out.predicted, out.loss, trained.labels)}

    def write_report_files(self, report: dict, report_path, title: str) -> list:
        from lorafit.report import plot_confusion

        return [plot_confusion(report["confusion_matrix"], report["labels"],
                               report_path.with_name(f"{report_path.stem}-confusion.png"), title=title)]

    def report_table(self, report: dict):
        from lorafit.report import metrics_table

        return metrics_table(report)

    def predict(self, trained, texts: list[str], console) -> list[dict]:
        return predict_texts(trained, texts, console)

    def predictions_table(self, rows: list[dict], top_k: int = 3):
        """The predicted label and its probability, and the `top_k` labels with theirs."""
        from lorafit.report import predictions_table

        def cells(row: dict) -> list[str]:
            ranked = sorted(row["probs"].items(), key=lambda item: -item[1])[:top_k]
            return [row["label"], f"{row['score']:.4f}", ", ".join(f"{name} {p:.3f}" for name, p in ranked)]

        return predictions_table(rows, {"label": {}, "probability": {"justify": "right"}, f"top {top_k}": {}}, cells)
