"""`lorafit predict`, the training plot (`lorafit plot`, and at the end of training) and TensorBoard logging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (MATPLOTLIB_COLOURS, assert_confusion_png, axes_boxes, colour_pixels, read_metrics, read_png,
                      toy_recipe, write_recipe)
from typer.testing import CliRunner

from lorafit.adapter import load_adapter_model
from lorafit.cli import app
from lorafit.recipe import RecipeError, recipe_from_dict
from lorafit.report import plot_confusion, plot_training, training_curves
from lorafit.device import autocast_for, pick_device, resolve_precision

TEXTS = ["ball goal team the", "the orbit of a rocket", "disk chip driver"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_run(tiny_models, toy_data, tmp_path_factory) -> Path:
    """A short run of the toy task on tiny Llama, logging to TensorBoard too."""
    root = tmp_path_factory.mktemp("run")
    recipe = toy_recipe(tiny_models["llama"], toy_data, root / "run",
                        train={"epochs": 2, "eval_every": 8, "save_every": None, "loggers": ["jsonl", "tensorboard"]})
    result = cli("train", write_recipe(root / "toy.yaml", recipe))
    assert result.exit_code == 0, result.output
    return root / "run"


# ---------------------------------------------------------------- predict


@torch.inference_mode()
def probs_by_hand(adapter_dir: Path, texts: list[str]) -> torch.Tensor:
    """The adapter model on `texts`, one text at a time, at the precision training used."""
    model, tokenizer, _ = load_adapter_model(adapter_dir)
    device = pick_device()
    autocast = autocast_for(device, resolve_precision("auto", device))
    rows = []
    for text in texts:
        with autocast():
            logits = model(**tokenizer(text, return_tensors="pt")).logits
        rows.append(logits.float().softmax(-1)[0])
    return torch.stack(rows)


def test_predict_texts_and_file(trained_run, tmp_path):
    adapter = trained_run / "adapter"
    expected = probs_by_hand(adapter, TEXTS)
    labels = json.loads((adapter / "lorafit.json").read_text())["labels"]

    source = tmp_path / "posts.jsonl"
    source.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    result = cli("predict", adapter, "--file", source, "--output", tmp_path / "predictions.jsonl")
    assert result.exit_code == 0, result.output
    assert "3 predictions in" in result.output
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    got = torch.tensor([[r["probs"][name] for name in labels] for r in rows])
    # Batched (padded, length-sorted) vs one at a time, both in training's precision.
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    assert [r["label"] for r in rows] == [labels[i] for i in got.argmax(-1).tolist()]
    assert [r["score"] for r in rows] == pytest.approx(got.max(-1).values.tolist())

    # Without --output: a table row per text with its top label and probability.
    result = cli("predict", adapter, *TEXTS)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for i, row in enumerate(rows, start=1):
        cells = (f"│ {i} │ {row['text']}", f"│ {row['label']} ", f"{row['score']:.4f}")
        assert any(all(cell in line for cell in cells) for line in lines), result.output


def test_predict_merged_model_matches_adapter(trained_run, tmp_path):
    assert cli("merge", trained_run / "adapter", "-o", tmp_path / "merged").exit_code == 0
    outputs = {}
    for name, target in (("adapter", trained_run / "adapter"), ("merged", tmp_path / "merged")):
        assert cli("predict", target, *TEXTS, "-o", tmp_path / f"{name}.jsonl").exit_code == 0
        outputs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    adapter = torch.tensor([list(r["probs"].values()) for r in outputs["adapter"]])
    merged = torch.tensor([list(r["probs"].values()) for r in outputs["merged"]])
    assert list(outputs["merged"][0]["probs"]) == list(outputs["adapter"][0]["probs"])  # same label order
    torch.testing.assert_close(merged, adapter, atol=5e-3, rtol=0)


def test_predict_errors_are_one_line(trained_run, tmp_path):
    result = cli("predict", trained_run / "adapter")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: nothing to predict: give texts as arguments or --file FILE"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ball"}\n{"body": "goal"}\n')
    result = cli("predict", trained_run / "adapter", "--file", bad, "-o", tmp_path / "p.jsonl")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad}: line 2 has no string 'text' field"
    assert not (tmp_path / "p.jsonl").exists()

    result = cli("predict", trained_run / "adapter", "--file", tmp_path / "posts.csv")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --file {tmp_path / 'posts.csv'}: file not found"


# ---------------------------------------------------------------- plots


def series_colours(image, box) -> list[int]:
    """How many pixels of each of the colours C0..C3 lie inside `box`."""
    return [len(colour_pixels(image, box, colour)[0]) for colour in MATPLOTLIB_COLOURS]


def assert_draws(image, box, steps, values, colour, xs=None, ys=None) -> None:
    """Every (step, value) has a pixel of `colour` within 3 px of where the axes in `box` put it.

    The axes span matplotlib's default view: the range of all data drawn in them (`xs`, `ys`;
    default `steps`, `values`) plus a 5% margin each side.
    """
    left, top, right, bottom = box
    xs, ys = xs or steps, ys or values
    (x0, x1), (y0, y1) = (min(xs), max(xs)), (min(ys), max(ys))
    rows, columns = colour_pixels(image, box, colour)
    assert len(rows), f"no {colour} pixels in {box}"
    for step, value in zip(steps, values):
        x = left + (0.05 + 0.9 * (step - x0) / (x1 - x0)) * (right - left)
        y = bottom - (0.05 + 0.9 * (value - y0) / (y1 - y0)) * (bottom - top)
        assert np.hypot(rows - y, columns - x).min() <= 3, (step, value)


def test_training_writes_plot_of_its_metrics(trained_run):
    metrics = read_metrics(trained_run)
    curves = training_curves(metrics)
    train_lines = [m for m in metrics if "split" not in m]
    assert curves.loss.steps == [m["step"] for m in train_lines] == list(range(2, 25, 2))
    assert curves.loss.values == [m["loss"] for m in train_lines]
    assert curves.lr.values == [m["lr"] for m in train_lines]
    assert sorted(curves.eval) == ["eval", "test"]
    assert curves.eval["eval"]["accuracy"].steps == [8, 16, 24]
    assert curves.eval["eval"]["accuracy"].values == [m["accuracy"] for m in metrics if m.get("split") == "eval"]
    assert curves.eval["test"]["macro_f1"].steps == [24]

    image = read_png(trained_run / "plot.png")
    assert image.shape[:2] == (462, 1650)  # figsize (15, 4.2) at 110 dpi
    loss_box, lr_box, eval_box = axes_boxes(image)
    # loss: train, eval and test lines (C0-C2); learning rate: one line; evaluation: accuracy and
    # macro-F1 of eval and test (C0-C3).
    assert [n > 0 for n in series_colours(image, loss_box)] == [True, True, True, False]
    assert [n > 0 for n in series_colours(image, lr_box)] == [True, False, False, False]
    assert all(n > 0 for n in series_colours(image, eval_box))
    losses = [v for series in (curves.loss, curves.eval["eval"]["loss"], curves.eval["test"]["loss"])
              for v in series.values]
    assert_draws(image, loss_box, curves.loss.steps, curves.loss.values, MATPLOTLIB_COLOURS[0], ys=losses)
    # A constant learning rate: one flat line across the panel.
    rows, columns = colour_pixels(image, lr_box, MATPLOTLIB_COLOURS[0])
    assert rows.max() - rows.min() <= 3 and columns.max() - columns.min() > 0.85 * (lr_box[2] - lr_box[0])


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_plot_draws_each_logged_value(tmp_path):
    steps = list(range(1, 21))
    lrs = [1e-3 * min(s / 5, (20 - s) / 15) for s in steps]  # warmup to step 5, then down to 0
    falling = [2.0 / s for s in steps]
    images = {}
    for name, losses in (("falling", falling), ("rising", falling[::-1])):
        run = write_metrics(tmp_path / name / "run", [{"step": s, "loss": v, "lr": lr}
                                                       for s, v, lr in zip(steps, losses, lrs)])
        image = images[name] = read_png(plot_training(run))
        loss_box, lr_box, eval_box = axes_boxes(image)
        assert_draws(image, loss_box, steps, losses, MATPLOTLIB_COLOURS[0])
        assert_draws(image, lr_box, steps, lrs, MATPLOTLIB_COLOURS[0])
        assert series_colours(image, eval_box) == [0, 0, 0, 0]  # "no evaluations yet"
    # The same run name and learning rates: only the loss panel tells the two apart.
    left, top, right, bottom = axes_boxes(images["falling"])[0]
    assert not np.array_equal(images["falling"][top:bottom, left:right], images["rising"][top:bottom, left:right])


def test_plot_command(trained_run, tmp_path):
    result = cli("plot", trained_run, "--output", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    # The same metrics drawn again: the picture training drew at its end, pixel for pixel.
    assert np.array_equal(read_png(tmp_path / "curves.png"), read_png(trained_run / "plot.png"))

    result = cli("plot", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path} is not a run directory: metrics.jsonl is missing"
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "lo\n')
    result = cli("plot", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'metrics.jsonl'}: line 2 is not valid JSON "
                                     f"(Unterminated string starting at)")
    assert not (tmp_path / "plot.png").exists()


def test_confusion_matrix_cells_follow_the_counts(tmp_path):
    matrix = [[9, 0, 1], [2, 5, 0], [0, 3, 6]]
    path = plot_confusion(matrix, ["a", "b", "c"], tmp_path / "confusion.png")
    assert_confusion_png(path, matrix)
    with pytest.raises(AssertionError):  # the check tells rows from columns
        assert_confusion_png(path, [list(column) for column in zip(*matrix)])


def test_curves_keep_the_last_record_of_a_step():
    records = [
        {"step": 2, "loss": 1.0, "lr": 0.1}, {"step": 4, "loss": 0.9, "lr": 0.1},
        {"step": 4, "split": "eval", "loss": 0.95, "accuracy": 0.5, "macro_f1": 0.4},
        # A resumed run re-logs step 4 and goes on.
        {"step": 4, "loss": 0.8, "lr": 0.1}, {"step": 6, "loss": 0.7, "lr": 0.05},
        {"step": 6, "split": "eval", "loss": 0.75, "accuracy": 0.75, "macro_f1": 0.7},
    ]
    curves = training_curves(records)
    assert (curves.loss.steps, curves.loss.values) == ([2, 4, 6], [1.0, 0.8, 0.7])
    assert curves.lr.values == [0.1, 0.1, 0.05]
    assert curves.eval["eval"]["accuracy"].values == [0.5, 0.75]


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_equal_metrics_jsonl(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    metrics = read_metrics(trained_run)
    train_lines = [m for m in metrics if "split" not in m]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in train_lines]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in train_lines], rel=1e-6)  # stored as fp32
    accuracy = events.Scalars("eval/accuracy")
    eval_lines = [m for m in metrics if m.get("split") == "eval"]
    assert [e.step for e in accuracy] == [m["step"] for m in eval_lines] == [8, 16, 24]
    assert [e.value for e in accuracy] == pytest.approx([m["accuracy"] for m in eval_lines], rel=1e-6)
    assert [e.step for e in events.Scalars("test/macro_f1")] == [24]


def test_tensorboard_is_off_by_default_and_loggers_are_validated(tiny_models, toy_data, tmp_path):
    assert recipe_from_dict({"name": "x", "model": {"name": "m"}}).train.loggers == ["jsonl"]
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"name": "x", "model": {"name": "m"}, "train": {"loggers": ["jsonl", "wandb"]}})
    assert str(err.value) == ("recipe: train.loggers: ['jsonl', 'wandb'] (list) is not valid: "
                              "expected a list of one of 'jsonl', 'tensorboard'")
    recipe = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "run", train={"max_steps": 2, "eval_every": None})
    assert cli("train", write_recipe(tmp_path / "toy.yaml", recipe)).exit_code == 0
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "plot.png").is_file()
