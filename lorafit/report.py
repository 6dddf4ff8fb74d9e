"""Showing metrics: training curves from metrics.jsonl, TensorBoard scalars, the eval table and confusion matrix.

Plots use matplotlib's object API (`Figure`, Agg canvas), never pyplot, so they work without a
display and leave no global figure state behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from lorafit.errors import LorafitError

PLOT_FILE = "plot.png"


# ---------------------------------------------------------------- training curves


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Curves:
    """What the training plot draws, read from metrics.jsonl."""

    loss: Series
    lr: Series
    eval: dict[str, dict[str, Series]]
    """{split: {"loss" or one of `eval_metrics()`: Series}}"""


def eval_metrics() -> tuple[str, ...]:
    """The evaluation metrics the plot draws besides loss: every task's `Task.eval_metrics`."""
    from lorafit.tasks import all_tasks

    return tuple(dict.fromkeys(metric for task in all_tasks() for metric in task.eval_metrics))


def read_metrics_log(run_dir: Path) -> list[dict]:
    """The records of `run_dir`/metrics.jsonl; raises `LorafitError` if it is missing or garbled."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LorafitError(f"{run_dir} is not a run directory: metrics.jsonl is missing")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise LorafitError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    return records


def training_curves(records: list[dict]) -> Curves:
    """Series by step. Training records have no "split"; evaluations do. A step logged twice
    (a resumed run appends) keeps its last record."""
    latest: dict[tuple[str, int], dict] = {}
    for record in records:
        if "step" in record:
            latest[(record.get("split", "train"), record["step"])] = record
    curves = Curves(Series(), Series(), {})
    for (split, step), record in sorted(latest.items(), key=lambda item: item[0][1]):
        if split == "train":
            for name, series in (("loss", curves.loss), ("lr", curves.lr)):
                if name in record:
                    series.steps.append(step)
                    series.values.append(record[name])
            continue
        for name in ("loss", *eval_metrics()):
            if name in record:
                series = curves.eval.setdefault(split, {}).setdefault(name, Series())
                series.steps.append(step)
                series.values.append(record[name])
    return curves


def plot_training(run_dir: Path, output: Path | None = None) -> Path:
    """Draw loss, learning rate and eval metrics against step; write `output` (default run_dir/plot.png)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    curves = training_curves(read_metrics_log(run_dir))
    if not curves.loss.steps:
        raise LorafitError(f"{run_dir / 'metrics.jsonl'} has no training records to plot yet")
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_loss, ax_lr, ax_eval = fig.subplots(1, 3)
    ax_loss.plot(curves.loss.steps, curves.loss.values, label="train")
    for split, series in curves.eval.items():
        if "loss" in series:
            ax_loss.plot(series["loss"].steps, series["loss"].values, "o-", label=split)
    ax_loss.set(title="loss", xlabel="step")
    ax_loss.legend()
    ax_lr.plot(curves.lr.steps, curves.lr.values)
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for split, series in curves.eval.items():
        for name in eval_metrics():
            if name in series:
                ax_eval.plot(series[name].steps, series[name].values, "o-", label=f"{split} {name}")
    if curves.eval:
        ax_eval.legend()
    else:
        ax_eval.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.set(title="evaluation", xlabel="step")
    for ax in (ax_loss, ax_lr, ax_eval):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(run_dir.name)
    return save_figure(fig, Path(output) if output else run_dir / PLOT_FILE)


def save_figure(fig, path: Path) -> Path:
    """Write a PNG via a temporary file, so a reader never sees half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LorafitError(f"could not write {path}: {err.strerror or err}") from err
    return path


# ---------------------------------------------------------------- evaluation report


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "") -> Path:
    """A confusion-matrix PNG: rows are true classes, columns predicted, cells counts."""
    from matplotlib.figure import Figure

    n = len(labels)
    size = min(4 + 0.45 * n, 16)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8 if n > 10 else 10)
    ax.set_yticks(range(n), labels, fontsize=8 if n > 10 else 10)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    if n <= 25:
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7 if n > 10 else 9,
                            color="white" if count > peak / 2 else "black")
    return save_figure(fig, Path(path))


def metrics_table(report: dict) -> Table:
    """Per-class precision/recall/F1/support, then accuracy and macro-F1, from `classification_report`."""
    table = Table(title=f"{report.get('split', '')} ({report.get('examples', '?')} examples)".strip())
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, scores in report["per_class"].items():
        table.add_row(name, f"{scores['precision']:.4f}", f"{scores['recall']:.4f}", f"{scores['f1']:.4f}",
                      str(scores["support"]))
    total = sum(s["support"] for s in report["per_class"].values())
    table.add_section()
    table.add_row("accuracy", "", "", f"{report['accuracy']:.4f}", str(total))
    table.add_row("macro-F1", "", "", f"{report['macro_f1']:.4f}", str(total))
    table.add_row("loss", "", "", f"{report['loss']:.4f}", "")
    return table


def predictions_table(rows: list[dict], columns: dict[str, dict], cells: Callable[[dict], list[str]]) -> Table:
    """`lorafit predict`'s table: per row of a task's `predict`, its number ("#") and its "text" (past 80
    characters, the first 77 and "..."; wrapped), then the task's `columns` ({name: `Table.add_column`
    options}), whose cells `cells(row)` gives in that order."""
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("text", overflow="fold")
    for name, options in columns.items():
        table.add_column(name, **options)
    for i, row in enumerate(rows, start=1):
        text = row["text"] if len(row["text"]) <= 80 else row["text"][:77] + "..."
        table.add_row(str(i), text, *cells(row))
    return table


# ---------------------------------------------------------------- TensorBoard


class TensorBoardLog:
    """metrics.jsonl records as TensorBoard scalars: `train/<key>` for training records and
    `<split>/<metric>` for evaluations, at the record's step."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LorafitError("train.loggers: 'tensorboard' needs the tensorboard package: "
                               "pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, record: dict) -> None:
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TeeLog:
    """Writes each record to several logs (metrics.jsonl first)."""

    def __init__(self, *logs):
        self.logs = logs

    def write(self, record: dict) -> None:
        for log in self.logs:
            log.write(record)

    def close(self) -> None:
        for log in self.logs:
            log.close()


def with_tensorboard(metrics_log, directory: Path) -> TeeLog:
    """`metrics_log` plus a `TensorBoardLog` in `directory`; closes `metrics_log` if TensorBoard is missing."""
    try:
        return TeeLog(metrics_log, TensorBoardLog(directory))
    except LorafitError:
        metrics_log.close()
        raise
