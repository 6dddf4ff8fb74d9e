"""Using a trained model of any task: load it from a run directory, an adapter or a merged model;
score it on a split (`lorafit eval`), label texts (`lorafit predict`) or generate (`lorafit generate`).

What each command computes is the model's task's (`lorafit.tasks`); this module finds the model,
its task and recipe, and runs inference as training's evaluation does: same device choice, same
precision rule (`train.precision` of the recipe through `resolve_precision`/`autocast_for`), same
eval batch size and length-sorted batches. So scoring a run's adapter on its test split reproduces
the test numbers in the run's metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorafit.adapter import CONFIG_FILE, META_FILE, load_adapter_model, read_adapter_spec
from lorafit.device import autocast_for, pick_device, precision_name, resolve_precision
from lorafit.errors import LorafitError
from lorafit.io import read_json, write_json
from lorafit.models import ModelSource, load_tokenizer, model_max_length
from lorafit.recipe import DataConfig, Recipe, TrainConfig, load_recipe, recipe_from_dict
from lorafit.tasks import Task, all_tasks, get_task

RUN_RECIPE = "recipe.yaml"
FALLBACK_MAX_LENGTH = 512
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TrainedModel:
    """A trained model ready for inference, and what is known about how it was trained."""

    model: torch.nn.Module
    tokenizer: object
    kind: str  # "run", "adapter" or "merged"
    path: Path
    recipe: Recipe | None
    """--recipe, else the run's recipe.yaml, else the recipe recorded in lorafit.json (if any)."""
    max_length: int
    """Inputs are truncated to this many tokens, as in training."""
    task: Task
    labels: list[str] | None = None
    """The label names in id order (labelling tasks), from the model's config."""

    @property
    def train_config(self) -> TrainConfig:
        """The recipe's train section, or the schema's defaults when there is no recipe."""
        return self.recipe.train if self.recipe else TrainConfig()


def locate(path: Path) -> tuple[str, Path]:
    """Tell what `path` holds: ("run", its adapter/), ("adapter", path) or ("merged", path)."""
    path = Path(path)
    if not path.exists():
        raise LorafitError(f"{path} not found")
    if (path / "adapter" / CONFIG_FILE).is_file() and (path / RUN_RECIPE).is_file():
        return "run", path / "adapter"
    if (path / CONFIG_FILE).is_file():
        return "adapter", path
    if (path / "config.json").is_file():
        return "merged", path
    raise LorafitError(f"{path} is not a run directory (adapter/ and recipe.yaml), an adapter (adapter_config.json) "
                       f"or a model directory (config.json)")


def model_task(kind: str, directory: Path) -> Task:
    """What a located model does. Adapters say so in lorafit.json or PEFT's task_type; merged models
    in lorafit.json, else their config.json names the architecture (a task `claims` it)."""
    if kind != "merged":
        return get_task(read_adapter_spec(directory).task)
    meta = read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    if meta.get("task"):
        return get_task(meta["task"])
    config = read_json(directory / "config.json")
    task = next((t for t in all_tasks() if t.claims(config)), None)
    if task is None:
        raise LorafitError(f"{directory}: cannot tell the model's task from its config.json (architectures "
                           f"{config.get('architectures')}) and it has no {META_FILE}")
    return task


def load_merged_model(directory: Path, meta: dict, task: Task):
    trust = bool(meta.get("trust_remote_code", False))
    try:
        model = task.model_class().from_pretrained(directory, dtype="auto", trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise LorafitError(f"could not load model {directory}: {str(err).splitlines()[0]}") from None
    tokenizer = load_tokenizer(ModelSource(str(directory), str(directory)), trust_remote_code=trust)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_trained(path: Path, base: str | None = None, recipe_path: Path | None = None) -> TrainedModel:
    """Load a run directory, an adapter (lorafit's or PEFT's, onto its base or `base`) or a merged model.

    The recipe is `recipe_path`, else the run's recipe.yaml, else the one recorded in lorafit.json,
    else None; `max_length` is the recipe's `data.max_length` (or lorafit.json's), at most the
    model's limit. Raises `LorafitError` for a path that is none of these, `base` given for a
    merged model, or files that do not load.
    """
    path = Path(path)
    kind, directory = locate(path)
    task = model_task(kind, directory)
    meta = read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    if kind == "merged":
        if base is not None:
            raise LorafitError(f"--base applies to adapters; {path} is a merged model")
        model, tokenizer = load_merged_model(directory, meta, task)
    else:
        model, tokenizer, _ = load_adapter_model(directory, base)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
    elif kind == "run":
        recipe = load_recipe(path / RUN_RECIPE)
    elif isinstance(meta.get("recipe"), dict):
        recipe = recipe_from_dict(meta["recipe"], source=str(directory / META_FILE))
    else:
        recipe = None
    limit = model_max_length(model) or FALLBACK_MAX_LENGTH
    max_length = min(recipe.data.max_length if recipe else meta.get("max_length") or limit, limit)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if task.labels_text else None
    return TrainedModel(model, tokenizer, kind, path, recipe, max_length, task, labels)


@dataclass
class Runtime:
    """Where and how inference runs: training's device, precision and eval batch size."""

    device: torch.device
    dtype: torch.dtype
    autocast: Callable
    batch_size: int


def runtime(trained: TrainedModel) -> Runtime:
    """The best device and the recipe's precision for `trained`, whose model is moved there."""
    cfg = trained.train_config
    device = pick_device()
    dtype = resolve_precision(cfg.precision, device)
    trained.model.to(device)
    return Runtime(device, dtype, autocast_for(device, dtype), cfg.eval_batch_size or 2 * cfg.batch_size)


@contextmanager
def progress_bar(console: Console | None, what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar; yields `advance(n)`, to pass as an `on_batch` callback."""
    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console or Console(), transient=True)
    with progress:
        bar = progress.add_task(what, total=total)
        yield lambda n: progress.advance(bar, n)


# ---------------------------------------------------------------- lorafit eval


@dataclass
class EvalResult:
    report: dict
    report_path: Path
    files: list[Path] = dataclasses.field(default_factory=list)
    """Pictures written beside the report (a classifier's confusion matrix)."""


def eval_data(trained: TrainedModel, split: str | None, data_files: str | None) -> tuple[DataConfig, str]:
    """The data to score on: the recipe's test split, or `split`, or a file `data_files` read with
    the recipe's columns."""
    recipe = trained.recipe
    if data_files is not None:
        fmt = DATA_FORMATS.get(Path(data_files).suffix)
        if fmt is None:
            raise LorafitError(f"--data-files {data_files}: use a {', '.join(DATA_FORMATS)} file")
        split = split or "test"
        columns = recipe.data if recipe else DataConfig()
        return dataclasses.replace(columns, path=fmt, data_files={split: str(data_files)}), split
    if recipe is None:
        raise LorafitError(f"{trained.path} records no recipe to say what data to score it on; "
                           f"pass --recipe RECIPE.yaml or --data-files FILE")
    split = split or recipe.data.test_split
    if split is None:
        raise LorafitError("the recipe has no test split (data.test_split is null); pass --split NAME")
    return recipe.data, split


def default_report_path(trained: TrainedModel, split: str) -> Path:
    """A run's report goes inside the run; others beside the model directory (never into it)."""
    if trained.kind == "run":
        return trained.path / f"eval-{split}.json"
    path = trained.path if trained.path.name else trained.path.resolve()
    return path.parent / f"{path.name}-eval-{split}.json"


def run_eval(path: Path, recipe_path: Path | None = None, split: str | None = None, data_files: str | None = None,
             max_samples: int | None = None, base: str | None = None, output: Path | None = None,
             console: Console | None = None, num_beams: int = 1) -> EvalResult:
    """Score a run, adapter or merged model on a split; write a JSON report (and the task's pictures).

    Data defaults to the recipe's test split, first `data.max_eval_samples` examples (as training
    scores it); `split`, `data_files` and `max_samples` override. The report holds what was scored
    (model, kind, split, data, precision, max_length) and the task's `eval_report`. `output`
    defaults to `default_report_path`; pictures go beside it. `num_beams` > 1: beam search for
    tasks that decode by it (`Task.beam_search`).
    """
    console = console or Console()
    if max_samples is not None and max_samples < 1:
        raise LorafitError(f"--max-samples {max_samples}: use a positive number")
    trained = load_trained(path, base, recipe_path)
    task = trained.task
    check_num_beams(task, num_beams)
    options = {"num_beams": num_beams} if task.beam_search else {}
    data_cfg, split = eval_data(trained, split, data_files)
    if max_samples is None and data_files is None and trained.recipe is not None:
        max_samples = trained.recipe.data.max_eval_samples
    examples = task.load_split(data_cfg, split, trained.labels, max_samples)
    report_path = Path(output) if output else default_report_path(trained, split)
    if report_path.suffix != ".json":
        raise LorafitError(f"--output {report_path}: the report is JSON; name it *.json")
    run = runtime(trained)
    report = {
        "model": str(path), "kind": trained.kind, "split": split,
        "data": data_cfg.data_files[split] if data_files else data_cfg.path,
        "precision": precision_name(run.dtype), "max_length": trained.max_length,
        **task.eval_report(trained, examples, split, run.batch_size, run.device, run.autocast, console, **options),
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report_path, report)
    files = task.write_report_files(report, report_path, title=f"{path} on {split}")
    console.print(task.report_table(report))
    console.print(f"report in {report_path}" + "".join(f", {file}" for file in files))
    return EvalResult(report, report_path, files)


# ---------------------------------------------------------------- lorafit predict


def read_texts(file: Path, text_column: str = "text") -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a .jsonl file (`text_column` of each object)."""
    file = Path(file)
    if not file.is_file():
        raise LorafitError(f"--file {file}: file not found")
    lines = file.read_text().splitlines()
    if file.suffix == ".txt":
        return [line for line in lines if line.strip()]
    if file.suffix != ".jsonl":
        raise LorafitError(f"--file {file}: use a .jsonl file (one JSON object per line) "
                           f"or a .txt file (one text per line)")
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LorafitError(f"{file}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            raise LorafitError(f"{file}: line {number} has no string {text_column!r} field")
        texts.append(row[text_column])
    return texts


def run_predict(path: Path, texts: list[str], file: Path | None = None, output: Path | None = None,
                base: str | None = None, console: Console | None = None) -> list[dict]:
    """Label `texts` and the texts of `file` with a labelling task's model (the task's `predict`); print
    a table, and write JSON lines to `output` if given."""
    console = console or Console()
    trained = load_trained(path, base)
    column = trained.recipe.data.text_column if trained.recipe else "text"
    texts = list(texts) + (read_texts(file, column) if file is not None else [])
    if not texts and trained.task.labels_text:
        raise LorafitError("nothing to predict: give texts as arguments or --file FILE")
    rows = trained.task.predict(trained, texts, console)
    if output is None:
        console.print(trained.task.predictions_table(rows))
        return rows
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    console.print(f"{len(rows)} predictions in {output}")
    return rows


# ---------------------------------------------------------------- lorafit generate


def run_generate(path: Path, prompt: str, max_new_tokens: int = 128, temperature: float | None = None,
                 top_p: float = 0.9, base: str | None = None, on_text: Callable[[str], None] | None = None,
                 num_beams: int = 1, **options) -> str:
    """Load the model at `path` (run, adapter or merged model) and generate from `prompt` (the task's
    `generate`; `options` are the task's, e.g. `use_chat_template` for causal LMs). `temperature`
    None is the task's `default_temperature`; `num_beams` > 1 is beam search (`Task.beam_search`)."""
    from lorafit.generate import check_sampling

    check_sampling(max_new_tokens, 0.0 if temperature is None else temperature, top_p)  # before minutes of loading
    trained = load_trained(path, base)
    check_num_beams(trained.task, num_beams)
    if temperature is None:
        temperature = trained.task.default_temperature
    return trained.task.generate(trained, prompt, max_new_tokens, temperature, top_p, num_beams=num_beams,
                                 on_text=on_text, **options)


def check_num_beams(task: Task, num_beams: int) -> None:
    """`--num-beams`: a positive number, and anything but 1 only for tasks that search beams."""
    if num_beams < 1:
        raise LorafitError(f"--num-beams {num_beams}: use 1 (greedy) or more (beam search), e.g. 4")
    if num_beams != 1 and not task.beam_search:
        names = ", ".join(t.name for t in all_tasks() if t.beam_search)
        raise LorafitError(f"--num-beams {num_beams}: {task.name} models do not decode by beam search (only "
                           f"{names}); leave out --num-beams")
