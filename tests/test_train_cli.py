"""End to end through the CLI on tiny random BERT, GPT-2 (Conv1D) and Llama models."""

from __future__ import annotations

import json
import math

import pytest
from conftest import read_metrics, toy_recipe, write_recipe
from safetensors.torch import load_file

TRAIN_FIELDS = {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "elapsed_s"}
EVAL_FIELDS = {"step", "split", "loss", "accuracy", "macro_f1"}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_train_writes_run_and_learns(kind, tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "toy.yaml", toy_recipe(tiny_models[kind], toy_data, out))
    result = run_cli("train", recipe, "--set", "train.epochs=6")
    assert result.exit_code == 0, result.output

    assert (out / "recipe.yaml").is_file()
    for directory in (out / "adapter", out / "checkpoints" / "step-10", out / "checkpoints" / "step-70"):
        assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                         "lorafit.json"}
    assert not (out / "checkpoints" / "step-5").exists()

    metrics = read_metrics(out)
    train_lines = [m for m in metrics if "split" not in m]
    eval_lines = [m for m in metrics if "split" in m]
    assert [m["step"] for m in train_lines] == list(range(2, 73, 2))  # 96 examples / 8 = 12 steps × 6 epochs
    assert all(set(m) == TRAIN_FIELDS for m in train_lines)
    assert all(set(m) == EVAL_FIELDS for m in eval_lines)
    assert [(m["step"], m["split"]) for m in eval_lines][-2:] == [(72, "eval"), (72, "test")]
    # Learnable toy task: the loss falls from chance (ln 3 = 1.10) and accuracy beats chance (1/3).
    losses = [m["loss"] for m in train_lines]
    assert losses[0] > 0.9
    assert sum(losses[-6:]) / 6 < 0.75 * losses[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.5

    meta = json.loads((out / "adapter" / "lorafit.json").read_text())
    assert meta["labels"] == ["space", "sports", "tech"]  # string labels, sorted
    assert meta["max_length"] == 32
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_eval_splits_give_a_test_curve(tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "toy.yaml", toy_recipe(tiny_models["bert"], toy_data, out,
                                                             train={"epochs": 2, "eval_every": 5, "save_every": None}))
    result = run_cli("train", recipe, "--set", "train.eval_splits=[eval,test]")
    assert result.exit_code == 0, result.output
    evals = [(m["step"], m["split"]) for m in read_metrics(out) if "split" in m]
    assert evals == [(5, "eval"), (5, "test"), (10, "eval"), (10, "test"), (15, "eval"), (15, "test"),
                     (20, "eval"), (20, "test"), (24, "eval"), (24, "test")]


def test_label_smoothing_shapes_the_training_loss(tiny_models, toy_data, tmp_path, run_cli):
    # Full-batch steps without dropout: the loss logged at step 40 is that of checkpoint step-39's
    # predictions on the whole train split, with smoothing 0.3 (and not the plain cross-entropy).
    from lorafit.inference import load_trained as load_classifier
    from lorafit.tasks.classification import predict_texts

    out, eps = tmp_path / "run", 0.3
    recipe = toy_recipe(tiny_models["bert"], toy_data, out, model={"dropout": 0.0}, optim={"lr": 3e-2},
                        train={"max_steps": 40, "batch_size": 96, "log_every": 1, "eval_every": None,
                               "save_every": 39, "precision": "fp32", "label_smoothing": eps})
    result = run_cli("train", write_recipe(tmp_path / "toy.yaml", recipe))
    assert result.exit_code == 0, result.output
    (logged,) = [m["loss"] for m in read_metrics(out) if m["step"] == 40 and "split" not in m]

    rows = [json.loads(line) for line in toy_data["train"].read_text().splitlines()]
    predictions = predict_texts(load_classifier(out / "checkpoints" / "step-39"), [r["text"] for r in rows])
    plain = smoothed = 0.0
    for row, pred in zip(rows, predictions):
        nll = {label: -math.log(p) for label, p in pred["probs"].items()}
        plain += nll[row["label"]] / len(rows)
        smoothed += ((1 - eps) * nll[row["label"]] + eps * sum(nll.values()) / len(nll)) / len(rows)
    assert logged == pytest.approx(smoothed, abs=1e-4)
    assert abs(smoothed - plain) > 1e-2, (smoothed, plain)
