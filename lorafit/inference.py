"""Using a trained model: load it from a run directory, an adapter or a merged model; score a
classifier on a labelled split (`lorafit eval`) and label new texts (`lorafit predict`).

Causal LMs load here too (`load_causal_lm`); their scoring is in `lm_inference`, their generation
in `generate`. `lorafit eval` hands causal LMs to `lm_inference.run_lm_eval`.

Inference runs as training's evaluation does: same device choice, same precision rule
(`train.precision` of the recipe through `resolve_precision`/`autocast_for`), same eval batch
size and length-sorted batches. So scoring a run's adapter on its test split reproduces the test
numbers in the run's metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafit.adapter import CONFIG_FILE, META_FILE, load_adapter_model, read_adapter_spec
from lorafit.data import TextSplit, TokenizedSplit, load_labelled_split, tokenize
from lorafit.errors import LorafitError
from lorafit.evaluate import classification_report, predict
from lorafit.io import read_json, write_json
from lorafit.lm import has_chat_template
from lorafit.models import TASK_CLASSES, ModelSource, load_tokenizer, model_max_length
from lorafit.recipe import DataConfig, Recipe, TrainConfig, load_recipe, recipe_from_dict
from lorafit.report import metrics_table, plot_confusion
from lorafit.device import autocast_for, pick_device, resolve_precision

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

    @property
    def train_config(self) -> TrainConfig:
        """The recipe's train section, or the schema's defaults when there is no recipe."""
        return self.recipe.train if self.recipe else TrainConfig()


@dataclass
class Classifier(TrainedModel):
    labels: list[str]


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


def model_task(kind: str, directory: Path) -> str:
    """What a located model does: "sequence-classification" or "causal-lm".

    Adapters say so in lorafit.json or PEFT's task_type; merged models in lorafit.json, else their
    config.json names the architecture (`...ForCausalLM`, GPT-2's `GPT2LMHeadModel`).
    """
    if kind != "merged":
        return read_adapter_spec(directory).task
    meta = read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    if meta.get("task"):
        return meta["task"]
    architectures = read_json(directory / "config.json").get("architectures") or []
    return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) \
        else "sequence-classification"


def load_merged_model(directory: Path, meta: dict, task: str = "sequence-classification"):
    trust = bool(meta.get("trust_remote_code", False))
    try:
        model = TASK_CLASSES[task].from_pretrained(directory, dtype="auto", trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise LorafitError(f"could not load model {directory}: {str(err).splitlines()[0]}") from None
    tokenizer = load_tokenizer(ModelSource(str(directory), str(directory)), trust_remote_code=trust)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_trained(path: Path, kind: str, directory: Path, task: str, base: str | None = None,
                 recipe_path: Path | None = None):
    """The model, tokenizer and recipe of a located run, adapter or merged model.

    The recipe is `recipe_path`, else the run's recipe.yaml, else the one recorded in lorafit.json,
    else None. Returns (model, tokenizer, recipe, max_length): max_length is the recipe's
    `data.max_length` (or lorafit.json's), at most the model's limit.
    """
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
    return model, tokenizer, recipe, max_length


def load_classifier(path: Path, base: str | None = None, recipe_path: Path | None = None) -> Classifier:
    """Load a run directory, an adapter (lorafit's or PEFT's, onto its base or `base`) or a merged model.

    Raises `LorafitError` for a path that is none of these, a causal LM, `base` given for a merged
    model, or files that do not load.
    """
    path = Path(path)
    kind, directory = locate(path)
    if model_task(kind, directory) == "causal-lm":
        raise LorafitError(f"{path} is a causal language model, not a classifier; "
                           f"generate text with: lorafit generate {path} --prompt TEXT")
    model, tokenizer, recipe, max_length = load_trained(path, kind, directory, "sequence-classification", base,
                                                        recipe_path)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return Classifier(model, tokenizer, kind, path, recipe, max_length, labels=labels)


@dataclass
class CausalLM(TrainedModel):
    @property
    def use_chat_template(self) -> bool:
        """Whether prompts are rendered with the chat template: the recipe's `data.use_chat_template`
        (default true) and the tokenizer has one, as training renders prompt + completion data."""
        wanted = self.recipe.data.use_chat_template if self.recipe else DataConfig().use_chat_template
        return wanted and has_chat_template(self.tokenizer)


def load_causal_lm(path: Path, base: str | None = None, recipe_path: Path | None = None) -> CausalLM:
    """Load a causal LM from a run directory, an adapter (onto its base or `base`) or a merged model.

    Raises `LorafitError` for a path that is none of these, a classifier, `base` given for a merged
    model, or files that do not load.
    """
    path = Path(path)
    kind, directory = locate(path)
    if model_task(kind, directory) != "causal-lm":
        raise LorafitError(f"{path} is a sequence-classification model, not a causal language model; "
                           f"label texts with: lorafit predict {path} TEXT")
    model, tokenizer, recipe, max_length = load_trained(path, kind, directory, "causal-lm", base, recipe_path)
    return CausalLM(model, tokenizer, kind, path, recipe, max_length)


def run_batches(classifier: Classifier, split: TokenizedSplit, console: Console, what: str):
    """`evaluate.predict` on the best device, at the recipe's precision, with a progress bar."""
    cfg = classifier.train_config
    device = pick_device()
    dtype = resolve_precision(cfg.precision, device)
    classifier.model.to(device)
    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    with progress:
        task = progress.add_task(what, total=len(split))
        out = predict(classifier.model, split, cfg.eval_batch_size or 2 * cfg.batch_size,
                      classifier.tokenizer.pad_token_id, device, autocast_for(device, dtype),
                      on_batch=lambda n: progress.advance(task, n))
    return out, "bf16" if dtype == torch.bfloat16 else "fp32"


# ---------------------------------------------------------------- lorafit eval


@dataclass
class EvalResult:
    report: dict
    report_path: Path
    confusion_path: Path | None = None  # classifiers only


def eval_data(trained: Classifier | CausalLM, split: str | None, data_files: str | None) -> tuple[DataConfig, str]:
    """The data to score on: the recipe's test split, or `split`, or a file `data_files` read with
    the recipe's columns (text and label; for causal LMs prompt, completion, messages, template)."""
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


def default_report_path(trained: Classifier | CausalLM, split: str) -> Path:
    """A run's report goes inside the run; others beside the model directory (never into it)."""
    if trained.kind == "run":
        return trained.path / f"eval-{split}.json"
    path = trained.path if trained.path.name else trained.path.resolve()
    return path.parent / f"{path.name}-eval-{split}.json"


def run_eval(path: Path, recipe_path: Path | None = None, split: str | None = None, data_files: str | None = None,
             max_samples: int | None = None, base: str | None = None, output: Path | None = None,
             console: Console | None = None) -> EvalResult:
    """Score a run, adapter or merged model on a labelled split; write a JSON report and a confusion PNG.

    Causal LMs are scored by `lm_inference.run_lm_eval` (loss, perplexity, exact match; no PNG).
    Data defaults to the recipe's test split, first `data.max_eval_samples` examples (as training
    scores it); `split`, `data_files` and `max_samples` override. The report holds loss, accuracy,
    macro-F1, per-class precision/recall/F1/support and the confusion matrix (`classification_report`),
    plus what was scored. `output` defaults to `default_report_path`; the PNG goes beside it.
    """
    console = console or Console()
    if max_samples is not None and max_samples < 1:
        raise LorafitError(f"--max-samples {max_samples}: use a positive number")
    kind, directory = locate(path)
    if model_task(kind, directory) == "causal-lm":
        from lorafit.lm_inference import run_lm_eval  # it imports this module

        return run_lm_eval(path, recipe_path, split, data_files, max_samples, base, output, console)
    classifier = load_classifier(path, base, recipe_path)
    data_cfg, split = eval_data(classifier, split, data_files)
    if max_samples is None and data_files is None and classifier.recipe is not None:
        max_samples = classifier.recipe.data.max_eval_samples
    texts = load_labelled_split(data_cfg, split, classifier.labels, max_samples)
    tokens = tokenize(texts, classifier.tokenizer, classifier.max_length)
    out, precision = run_batches(classifier, tokens, console, f"eval {split}")
    report = {
        "model": str(path), "kind": classifier.kind, "split": split,
        "data": data_cfg.data_files[split] if data_files else data_cfg.path,
        "examples": len(tokens), "precision": precision, "max_length": classifier.max_length,
        "labels": classifier.labels,
        **classification_report(out.labels, out.predicted, out.loss, classifier.labels),
    }
    report_path = Path(output) if output else default_report_path(classifier, split)
    if report_path.suffix != ".json":
        raise LorafitError(f"--output {report_path}: the report is JSON; name it *.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report_path, report)
    confusion_path = plot_confusion(report["confusion_matrix"], classifier.labels,
                                    report_path.with_name(f"{report_path.stem}-confusion.png"),
                                    title=f"{path} on {split}")
    console.print(metrics_table(report))
    console.print(f"report in {report_path}, confusion matrix in {confusion_path}")
    return EvalResult(report, report_path, confusion_path)


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


def predict_texts(classifier: Classifier, texts: list[str], console: Console | None = None) -> list[dict]:
    """For each text, in order: {"text", "label" (the most probable), "score" (its probability),
    "probs" ({label: probability} for every label)}."""
    console = console or Console()
    # Labels are unknown: predict's loss over these placeholder ids is meaningless and ignored.
    tokens = tokenize(TextSplit(texts, [0] * len(texts)), classifier.tokenizer, classifier.max_length)
    out, _ = run_batches(classifier, tokens, console, "predict")
    rows = []
    for text, probs in zip(texts, out.probs.tolist()):
        top = max(range(len(probs)), key=probs.__getitem__)
        rows.append({"text": text, "label": classifier.labels[top], "score": probs[top],
                     "probs": dict(zip(classifier.labels, probs))})
    return rows


def predictions_table(rows: list[dict], top_k: int = 3) -> Table:
    table = Table()
    for column in ("#", "text", "label", "probability", f"top {top_k}"):
        table.add_column(column, justify="right" if column in ("#", "probability") else "left",
                         overflow="fold" if column == "text" else "ellipsis")
    for i, row in enumerate(rows, start=1):
        ranked = sorted(row["probs"].items(), key=lambda item: -item[1])[:top_k]
        text = row["text"] if len(row["text"]) <= 80 else row["text"][:77] + "..."
        table.add_row(str(i), text, row["label"], f"{row['score']:.4f}",
                      ", ".join(f"{name} {p:.3f}" for name, p in ranked))
    return table


def run_predict(path: Path, texts: list[str], file: Path | None = None, output: Path | None = None,
                base: str | None = None, console: Console | None = None) -> list[dict]:
    """Label `texts` and the texts of `file`; print a table, and write JSON lines to `output` if given."""
    console = console or Console()
    classifier = load_classifier(path, base)
    column = classifier.recipe.data.text_column if classifier.recipe else "text"
    texts = list(texts) + (read_texts(file, column) if file is not None else [])
    if not texts:
        raise LorafitError("nothing to predict: give texts as arguments or --file FILE")
    rows = predict_texts(classifier, texts, console)
    if output is None:
        console.print(predictions_table(rows))
        return rows
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    console.print(f"{len(rows)} predictions in {output}")
    return rows
