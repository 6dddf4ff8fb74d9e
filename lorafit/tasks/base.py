"""The task interface: everything the rest of lorafit asks of a task.

A task (sequence classification, causal LM, seq2seq, token classification) is one module in
`lorafit/tasks/` holding one `Task` subclass. `train`, `merge`, `inference` and `cli` call only the
methods below; none of them branches on the task's name. A task's methods are plain functions of
their arguments (a task object holds no state), so the same object serves training, evaluation,
merging and inference, in any process.

Shapes used throughout:
- raw examples: whatever `load_data` returns per split (texts and labels, prompt/completion dicts,
  source/target pairs, word and tag lists); only the task reads them;
- a tokenized split: any object with `__len__` and `lengths` (tokens per example, for
  length-grouped batches and padding); only the task reads the rest;
- a batch: a dict of tensors from `collate`, moved to the device as is; `loss` and `evaluate`
  read it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch

from lorafit.errors import LorafitError


class Split(Protocol):
    """A tokenized split: examples that batches are drawn from by index."""

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> list[int]: ...


@dataclass
class TaskData:
    """A task's raw splits: train, eval (held out of train when the data has no eval split), test
    (None when the recipe has none), and the label names of labelling tasks (None otherwise)."""

    train: Any
    eval: Any
    test: Any | None
    labels: list[str] | None = None


class Task:
    """One task. Subclasses set the class attributes and implement the methods that raise
    NotImplementedError here; the defaults fit tasks that do not need them."""

    name: ClassVar[str]
    """The recipe's `model.task`, e.g. "sequence-classification"."""
    peft_task_type: ClassVar[str]
    """PEFT's `task_type` in adapter_config.json, e.g. "SEQ_CLS"."""
    auto_class: ClassVar[str]
    """The transformers class that loads the model, e.g. "AutoModelForSequenceClassification"."""
    peft_head_modules: ClassVar[tuple[str, ...]] = ()
    """Names PEFT's model class for this task adds to modules_to_save itself (matched as name endings)."""
    labels_text: ClassVar[bool] = False
    """A labelling task: has label names (id2label) and supports `lorafit predict`."""
    generates: ClassVar[bool] = False
    """A generating task: supports `lorafit generate`."""
    beam_search: ClassVar[bool] = False
    """A generating task that decodes by beam search too: `lorafit eval` and `lorafit generate` take
    `--num-beams`, which reaches `eval_report` and `generate` as `num_beams`."""
    default_temperature: ClassVar[float] = 0.7
    """`lorafit generate`'s sampling temperature when the command line gives none (0: greedy)."""
    data_keys: ClassVar[tuple[str, ...]] = ()
    """`data.*` keys that only this task reads: another task's recipe setting one away from its default is an
    error naming the tasks that list it (several tasks may list the same key)."""
    train_keys: ClassVar[tuple[str, ...]] = ()
    """`train.*` keys that only this task reads, as `data_keys` (e.g. label_smoothing)."""
    eval_metrics: ClassVar[tuple[str, ...]] = ()
    """The metrics besides loss that `evaluate` returns and the training plot draws (e.g. accuracy)."""

    # ------------------------------------------------------------ model

    def model_class(self):
        """The `AutoModelFor...` class, imported on first use."""
        import transformers

        return getattr(transformers, self.auto_class)

    def model_kwargs(self, labels: list[str] | None) -> dict:
        """Extra `from_pretrained` arguments (num_labels, id2label, label2id for labelling tasks)."""
        return {}

    def claims(self, config: dict) -> bool:
        """Whether a model directory's config.json (with no lorafit.json beside it) is this task's model."""
        return False

    # ------------------------------------------------------------ recipe and data

    def check_recipe(self, recipe) -> list[str]:
        """Problems with `recipe` that only this task knows of, each naming its key (see recipe.RecipeError)."""
        return []

    def load_data(self, cfg, seed: int) -> TaskData:
        """The recipe's train, eval and test splits as raw examples (`cfg` is the recipe's DataConfig)."""
        raise NotImplementedError

    def load_split(self, cfg, split: str, labels: list[str] | None, max_samples: int | None = None) -> Any:
        """One split's raw examples for `lorafit eval` (first `max_samples`); labels unseen in training are an error."""
        raise NotImplementedError

    def tokenize(self, examples: Any, tokenizer, cfg, max_length: int, train: bool = False) -> Split:
        """Token ids and targets for raw examples. `cfg` is the DataConfig (its cache, packing and
        column settings); `train` marks the training split (packing applies there only)."""
        raise NotImplementedError

    def check_split(self, name: str, examples: Any, split: Split, cfg) -> list[str]:
        """Check split `name` ("train", "eval" or "test") of the recipe (`cfg`, its DataConfig), tokenized
        from `examples`; raise `LorafitError` for one training cannot use (e.g. nothing left after
        truncation). Returns notes for the log (examples dropped, packing)."""
        return []

    def collate(self, split: Split, indices: list[int], pad_id: int, multiple: int = 1,
                cap: int | None = None) -> dict[str, torch.Tensor]:
        """The batch of examples `indices`, padded to a multiple of `multiple` (at most `cap`)."""
        raise NotImplementedError

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets `loss` sums over in this (host) batch: examples, labelled tokens, tags."""
        raise NotImplementedError

    # ------------------------------------------------------------ training

    def prepare(self, model) -> list[str]:
        """Probe what the task's fast paths need, in fp32 before any speed-up (e.g. the causal-LM
        loss path); returns notes for the log."""
        return []

    def loss(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        """The summed loss over the batch's targets: `count_targets(batch)` times the mean loss the
        model's own forward gives with `labels=`."""
        raise NotImplementedError

    def evaluate(self, model, split: Split, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                 autocast: Callable = nullcontext, on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
        """The metrics training logs for a split (loss first); `on_batch(n)` reports progress."""
        raise NotImplementedError

    # ------------------------------------------------------------ merge

    def probe_batch(self, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        """A small batch of varied lengths that `lorafit merge` runs through the adapter model and the
        merged model to check the merge."""
        raise NotImplementedError

    @torch.inference_mode()
    def probe_logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 logits on the probe batch, padded positions left out where logits are per token."""
        logits = model(**batch, use_cache=False).logits.float()  # no cache: some models fail to build one
        return logits[batch["attention_mask"].bool()] if logits.ndim == 3 else logits

    # ------------------------------------------------------------ inference

    def eval_report(self, trained, examples: Any, split: str, batch_size: int, device: torch.device,
                    autocast: Callable, console) -> dict:
        """`lorafit eval`: the full report on raw `examples` of `split` for a loaded `inference.TrainedModel`
        (metrics, per-class or per-entity tables, samples), JSON-ready. A `beam_search` task also takes
        `num_beams` (1: greedy)."""
        raise NotImplementedError

    def write_report_files(self, report: dict, report_path, title: str) -> list:
        """Pictures beside the JSON report (e.g. a confusion matrix); returns their paths."""
        return []

    def report_table(self, report: dict):
        """A rich Table of the report's headline metrics, for the terminal."""
        raise NotImplementedError

    def predict(self, trained, texts: list[str], console) -> list[dict]:
        """`lorafit predict`: one JSON-ready row per text (labelling tasks)."""
        raise LorafitError(f"{trained.path} is a {self.name} model, which does not label texts; "
                           f"generate with: lorafit generate {trained.path} --prompt TEXT")

    def predictions_table(self, rows: list[dict]):
        """A rich Table of `predict`'s rows."""
        raise NotImplementedError

    def generate(self, trained, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 num_beams: int = 1, on_text: Callable[[str], None] | None = None, **options) -> str:
        """`lorafit generate`: the model's output for `prompt` (generating tasks), streamed to `on_text`."""
        raise LorafitError(f"{trained.path} is a {self.name} model, which does not generate text; "
                           f"label texts with: lorafit predict {trained.path} TEXT")
