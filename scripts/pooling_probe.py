"""Linear probe of all-MiniLM-L6-v2's frozen features on 20 Newsgroups: CLS token, BERT pooler, mean pooling.

A cheap check of whether a mean-pooling head (what sentence-transformers trained this checkpoint
with) would start far ahead of the pooler head that transformers' BertForSequenceClassification
uses. A seeded sample of train and test posts (headers, footers and quotes removed) is encoded
once in bf16, and a logistic regression is fit on each kind of feature.

    SCIKIT_LEARN_DATA=../shared/data/scikit_learn_data python scripts/pooling_probe.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import fetch_20newsgroups
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel

from lorafit.models import load_tokenizer, resolve_model

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@torch.no_grad()
def features(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """CLS hidden state, pooler output and attention-masked mean of the last hidden states, per text."""
    order = np.argsort([len(t) for t in texts])  # similar lengths together: little padding
    parts: dict[str, list[np.ndarray]] = {"cls": [], "pooler": [], "mean": []}
    for start in range(0, len(texts), batch_size):
        batch = tokenizer([texts[i] for i in order[start:start + batch_size]], truncation=True,
                          max_length=max_length, padding=True, return_tensors="pt")
        result = model(**batch)
        hidden = result.last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        parts["cls"].append(hidden[:, 0].numpy())
        parts["pooler"].append(result.pooler_output.float().numpy())
        parts["mean"].append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    back = np.argsort(order)  # rows return to the order of `texts`
    return {kind: np.concatenate(rows)[back] for kind, rows in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1500, help="posts drawn from each of train and test")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    source = resolve_model(MODEL)
    tokenizer = load_tokenizer(source)
    model = AutoModel.from_pretrained(source.path, **source.kwargs).eval().to(torch.bfloat16)
    remove = ("headers", "footers", "quotes")
    train = fetch_20newsgroups(subset="train", remove=remove)
    test = fetch_20newsgroups(subset="test", remove=remove)
    rng = np.random.default_rng(0)
    train_ids = rng.choice(len(train.data), args.samples, replace=False)
    test_ids = rng.choice(len(test.data), args.samples, replace=False)

    start = time.perf_counter()
    x_train = features(model, tokenizer, [train.data[i] for i in train_ids], args.max_length)
    x_test = features(model, tokenizer, [test.data[i] for i in test_ids], args.max_length)
    print(f"encoded {2 * args.samples} posts in {time.perf_counter() - start:.0f} s")
    for kind in x_train:
        probe = LogisticRegression(max_iter=2000, C=10).fit(x_train[kind], train.target[train_ids])
        print(f"{kind:7s} test accuracy {probe.score(x_test[kind], test.target[test_ids]):.4f}")


if __name__ == "__main__":
    main()
