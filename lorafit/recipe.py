"""Recipes: the typed schema (the single source of defaults), YAML loading, `--set` overrides.

A recipe is YAML with the sections below. Every key is checked against the schema: unknown keys
(with a "did you mean"), wrong types and out-of-range values are all collected and reported
together as one `RecipeError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorafit.errors import LorafitError
from lorafit.tasks import TASK_NAMES

NEWSGROUPS_PARTS = ("headers", "footers", "quotes")


class RecipeError(LorafitError):
    """One or more problems in a recipe, each naming the key, the value and the fix."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        if len(problems) == 1:
            message = f"{source}: {problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            message = f"{source} has {len(problems)} problems:\n{lines}"
        super().__init__(message)


def _rule(check, fix: str) -> dict:
    """Field metadata: `check(value) -> bool` plus the fix to print when it fails."""
    return {"check": check, "fix": fix}


@dataclass
class ModelConfig:
    name: str = ""
    """Hub id (e.g. sentence-transformers/all-MiniLM-L6-v2) or a local model directory."""
    task: str = field(default=TASK_NAMES[0],
                      metadata=_rule(lambda v: v in TASK_NAMES, f"use one of {', '.join(TASK_NAMES)}"))
    """What the model is trained to do (a task in `lorafit.tasks`); picks the AutoModel class, the data, the loss
    and the metrics."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust its author."""
    dropout: float | None = field(default=0.0, metadata=_rule(lambda v: 0 <= v < 1, "use a value in [0, 1), or null"))
    """Dropout inside the frozen base model (hidden, attention, classifier). 0 turns it off (faster; LoRA keeps
    its own lora.dropout); null keeps the checkpoint's own rates."""
    attention_dropout: float | None = field(default=None,
                                            metadata=_rule(lambda v: 0 <= v < 1, "use a value in [0, 1), or null"))
    """Dropout on the attention probabilities alone; null follows model.dropout. 0 here with dropout 0.1 keeps
    dropout on the hidden states while SDPA runs its fused kernel."""


@dataclass
class LoraConfig:
    rank: int = field(default=8, metadata=_rule(lambda v: v > 0, "use a positive integer such as 8"))
    """r: the rank of the update B·A."""
    alpha: float = field(default=16.0, metadata=_rule(lambda v: v > 0, "use a positive number such as 16"))
    """The update is scaled by alpha/rank (or alpha/sqrt(rank) with use_rslora)."""
    dropout: float = field(default=0.1, metadata=_rule(lambda v: 0 <= v < 1, "use a value in [0, 1), e.g. 0.1"))
    """Dropout on the LoRA branch input."""
    target_modules: list[str] | str = field(
        default_factory=lambda: ["query", "value"],
        metadata=_rule(lambda v: v == "all-linear" or (isinstance(v, list) and len(v) > 0),
                       'give a non-empty list of module names, or "all-linear"'),
    )
    """Module names matched in full or as a dotted suffix, or "all-linear" (every Linear/Conv1D but the head)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter. Added automatically: every module the checkpoint
    lacks (the task head), and the modules PEFT takes with the head (names ending in classifier or score)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(rank) instead of alpha/rank."""
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """How A and B start. default: A Kaiming-uniform, B zero; gaussian: A ~ N(0, 1/rank²), B zero; pissa: the
    top-rank SVD of each base weight (its principal part) becomes A and B and the frozen base keeps the rest;
    olora: the same with the first rank columns of a QR decomposition. pissa/olora adapters are saved as a
    plain LoRA of twice the rank on the original base."""
    init_iters: int | None = field(default=None, metadata=_rule(lambda v: v >= 0, "use an integer >= 0, or null"))
    """pissa only: null computes the exact SVD; N a randomized SVD with N power iterations (fast on big models)."""
    rank_schedule: dict[int, float] = field(
        default_factory=dict,
        metadata=_rule(lambda v: all(step > 0 and rank >= 1 for step, rank in v.items()),
                       "give {step: mean rank} with steps > 0 and mean ranks >= 1, e.g. {600: 8, 1200: 4}"),
    )
    """{step: mean rank}: after each named optimizer step, truncate every module's update by SVD so that the
    ranks add up to mean rank × the number of adapted modules, shared between modules by singular-value energy."""


@dataclass
class DataConfig:
    path: str = "20newsgroups"
    """`20newsgroups` (scikit-learn's loader), `conll` (token classification: CoNLL-style text files), or anything
    `datasets.load_dataset` takes (json, csv, parquet, text, a hub name)."""
    data_files: str | list[str] | dict[str, Any] | None = None
    """For json/csv/parquet/text: a path, a list of paths, or {train: ..., test: ...}."""
    subset: str | None = None
    """A hub dataset's configuration ("subset" on its page), e.g. de-en for wmt/wmt16: load_dataset's `name`."""
    remove: list[str] = field(
        default_factory=lambda: list(NEWSGROUPS_PARTS),
        metadata=_rule(lambda v: set(v) <= set(NEWSGROUPS_PARTS), f"use a subset of {list(NEWSGROUPS_PARTS)}"),
    )
    """20newsgroups only: the parts of each post to strip."""
    text_column: str = "text"
    """Classification: the input text. Causal LM without prompt/messages columns: the text to model."""
    label_column: str = "label"
    """Classification only: the class (integers or strings)."""
    prompt_column: str | None = None
    """Causal LM: prompt + completion data; the loss covers the completion only."""
    completion_column: str | None = None
    messages_column: str | None = None
    """Causal LM: chat data (lists of {role, content}), rendered with the chat template; loss on assistant turns."""
    prompt_template: str | None = None
    """Causal LM: a format string over the row's columns that builds the prompt, e.g. "Classify:\\n{text}"."""
    use_chat_template: bool = True
    """Causal LM prompt + completion: render them as a user turn and an assistant turn when the tokenizer has a chat template."""
    tokens_column: str = "tokens"
    """Token classification: the words of each example, a list of strings per row."""
    tags_column: str = "ner_tags"
    """Token classification: one tag per word, a list per row (strings, or integers named by the dataset's
    ClassLabel feature when it has one)."""
    tag_scheme: Literal["IOB1", "IOB2", "IOBES", "none"] = "IOB2"
    """Token classification: how tags mark entities (B-PER, I-PER, O ...), for entity-level scores through
    seqeval; none for tags that are not entities (part of speech): token accuracy only."""
    label_all_subwords: bool = False
    """Token classification: every sub-word of a word carries its tag in the loss; false: its first only."""
    packing: bool = False
    """Causal LM: pack examples into max_length blocks (no padding); attention and loss never cross examples."""
    source_column: str = "source"
    """Seq2seq: the input text (what is translated or summarized)."""
    target_column: str | None = None
    """Seq2seq: the output text the model learns to produce; needed unless source_lang/target_lang pick the
    languages of a hub `translation` column."""
    source_lang: str | None = None
    """Seq2seq on hub translation data (rows {"translation": {"en": ..., "de": ...}}): the source language, e.g. en."""
    target_lang: str | None = None
    """Seq2seq on hub translation data: the target language key, e.g. de."""
    source_prefix: str = ""
    """Seq2seq: text put before every source, in training and generation alike, e.g. "translate English to German: "."""
    max_target_length: int | None = field(default=None, metadata=_rule(lambda v: v > 0,
                                                                       "use a positive number of tokens or null"))
    """Seq2seq: targets are truncated to this many tokens, and generation stops there; null: data.max_length."""
    train_split: str = "train"
    eval_split: str | None = None
    """None: hold out `eval_fraction` of the train split (stratified, seeded)."""
    eval_fraction: float = field(default=0.05, metadata=_rule(lambda v: 0 < v < 1, "use a fraction in (0, 1), e.g. 0.05"))
    test_split: str | None = "test"
    """None: no test evaluation."""
    max_length: int = field(default=256, metadata=_rule(lambda v: v > 0, "use a positive number of tokens such as 256"))
    """Inputs are truncated to this many tokens."""
    max_train_samples: int | None = field(default=None, metadata=_rule(lambda v: v > 0, "use a positive integer or null"))
    """Use only the first N training examples (after the eval hold-out); handy for smoke runs."""
    max_eval_samples: int | None = field(default=None, metadata=_rule(lambda v: v > 0, "use a positive integer or null"))
    """Use only the first N examples of the eval and test splits (seq2seq: also the ones translated for BLEU and chrF
    at every evaluation, the slow part of it)."""
    cache: bool = True
    """Keep tokenized splits in a content-hashed cache ($LORAFIT_CACHE, else ~/.cache/lorafit) so later runs skip tokenizing."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = field(default=5e-4, metadata=_rule(lambda v: v > 0, "use a positive learning rate such as 5.0e-4"))
    weight_decay: float = field(default=0.01, metadata=_rule(lambda v: v >= 0, "use a value >= 0"))
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Shape of the learning rate after warmup."""
    warmup_ratio: float = field(default=0.06, metadata=_rule(lambda v: 0 <= v < 1, "use a fraction in [0, 1)"))
    """Fraction of all optimizer steps spent warming up linearly from 0."""
    max_grad_norm: float | None = field(default=1.0, metadata=_rule(lambda v: v > 0, "use a positive number or null"))
    """Clip the global gradient norm to this value; null disables clipping."""


@dataclass
class TrainConfig:
    epochs: int = field(default=3, metadata=_rule(lambda v: v > 0, "use a positive integer"))
    max_steps: int | None = field(default=None, metadata=_rule(lambda v: v > 0, "use a positive integer or null"))
    """Optimizer steps to run; overrides `epochs` when set."""
    batch_size: int = field(default=16, metadata=_rule(lambda v: v > 0, "use a positive integer such as 16"))
    grad_accum_steps: int = field(default=1, metadata=_rule(lambda v: v > 0, "use a positive integer"))
    """Micro-batches per optimizer step: the effective batch is batch_size × grad_accum_steps."""
    eval_batch_size: int | None = field(default=None, metadata=_rule(lambda v: v > 0, "use a positive integer or null"))
    """Batch size for evaluation; null means 2 × batch_size."""
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    """auto: bf16 where the hardware computes it natively (CPUs with AVX512-BF16/AMX, Ampere+ GPUs), else fp32."""
    group_by_length: bool = True
    """Batch examples of similar length together (shuffled, seeded) so less compute goes to padding."""
    pad_to_multiple_of: int | None = field(default=None, metadata=_rule(lambda v: v > 0, "use a positive integer or null"))
    """Round each batch's padded length up to a multiple of this; null: 64 on GPUs (few distinct shapes, so
    shape-specialized kernels are planned once), 1 on CPUs (no extra padding)."""
    label_smoothing: float = field(default=0.0, metadata=_rule(lambda v: 0 <= v < 1, "use a fraction in [0, 1), e.g. 0.1"))
    """Sequence classification: the training loss aims at 1 - x on the true class and spreads x over all classes."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile the model (first steps are slow while it compiles)."""
    log_every: int = field(default=10, metadata=_rule(lambda v: v > 0, "use a positive number of steps"))
    eval_every: int | None = field(default=200, metadata=_rule(lambda v: v > 0, "use a positive number of steps or null"))
    """Evaluate every N optimizer steps (and always at the end)."""
    eval_splits: list[Literal["eval", "test"]] = field(default_factory=lambda: ["eval"])
    """The splits evaluated every eval_every steps; add test for a test-accuracy curve. The end of training evaluates both."""
    eval_at_start: bool = False
    """Also evaluate (eval and test splits) before the first step: the base model's numbers, logged as step 0."""
    save_every: int | None = field(default=500, metadata=_rule(lambda v: v > 0, "use a positive number of steps or null"))
    """Write checkpoints/step-N every N optimizer steps."""
    keep_checkpoints: int | None = field(default=None, metadata=_rule(lambda v: v > 0, "use a positive integer or null"))
    """Keep only the newest N checkpoints (older ones are deleted once a new one is complete); null keeps all."""
    skip_nonfinite: bool = False
    """Skip batches whose loss or gradient is NaN/inf (and count them) instead of stopping the run."""
    output_dir: str | None = None
    """Where the run writes its files; null means runs/<name>."""
    loggers: list[Literal["jsonl", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go: metrics.jsonl always; add "tensorboard" for event files in <output_dir>/tensorboard."""


@dataclass
class Recipe:
    name: str = ""
    """Run name; defaults to the recipe file's stem."""
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        args = typing.get_args(annotation)
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        annotation, str(annotation)
    )


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to the annotation) for YAML-loaded `value`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in typing.get_args(annotation), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_type,) = typing.get_args(annotation)
        converted = [_coerce(v, item_type) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        if not typing.get_args(annotation):
            return True, value
        key_type, value_type = typing.get_args(annotation)
        # JSON (a recipe kept in lorafit.json) writes every key as a string: "600" stands for 600.
        as_key = lambda k: int(k) if key_type is int and isinstance(k, str) and k.isdigit() else k  # noqa: E731
        pairs = [(_coerce(as_key(k), key_type), _coerce(v, value_type)) for k, v in value.items()]
        return all(k[0] and v[0] for k, v in pairs), {k[1]: v[1] for k, v in pairs}
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads `5e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if annotation is Any:
        return True, value
    raise TypeError(f"unsupported annotation {annotation!r}")


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending every problem found to `problems`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'recipe'}: expected a mapping of keys, got {_describe(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            problems.append(f"{dotted}: unknown key ({hint})")
            continue
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{dotted}.", problems)
            continue
        ok, converted = _coerce(value, annotation)
        if not ok:
            problems.append(f"{dotted}: {_describe(value)} is not valid: expected {_type_name(annotation)}")
            continue
        rule = fields[key].metadata
        if rule and converted is not None and not rule["check"](converted):
            problems.append(f"{dotted}: {converted!r} is out of range: {rule['fix']}")
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _cross_checks(recipe: Recipe) -> list[str]:
    """Rules that involve more than one key."""
    data, problems = recipe.data, []
    if (data.prompt_column is None) != (data.completion_column is None):
        problems.append("data.prompt_column / data.completion_column: give both (prompt + completion data) or neither")
    if data.messages_column and data.prompt_column:
        problems.append("data.messages_column: chat data and prompt + completion data exclude each other; pick one")
    lora = recipe.lora
    if lora.init_iters is not None and lora.init != "pissa":
        problems.append(f"lora.init_iters: only for lora.init: pissa (the init is {lora.init!r}); remove it")
    if lora.rank_schedule:
        steps = sorted(lora.rank_schedule)
        ranks = [lora.rank_schedule[step] for step in steps]
        if ranks[0] >= lora.rank or any(later >= earlier for earlier, later in zip(ranks, ranks[1:])):
            problems.append(f"lora.rank_schedule: the mean ranks must fall, step after step, from below lora.rank "
                            f"({lora.rank}); got {dict(zip(steps, ranks))}")
        if lora.init in ("pissa", "olora"):
            problems.append(f"lora.rank_schedule: cutting ranks and lora.init: {lora.init} exclude each other "
                            f"(the cut would truncate the principal part too); pick one")
        if recipe.train.max_steps is not None and steps[-1] > recipe.train.max_steps:
            problems.append(f"lora.rank_schedule: step {steps[-1]} is past train.max_steps ({recipe.train.max_steps})")
    return problems + _task_checks(recipe)


def _task_checks(recipe: Recipe) -> list[str]:
    """A key that only other tasks read (their `train_keys`, `data_keys`) set away from its default, and
    the recipe's task's own `check_recipe`."""
    from lorafit.tasks import all_tasks, get_task  # task modules import the rest of lorafit

    task, problems = get_task(recipe.model.task), []
    for section, keys_of in (("train", lambda t: t.train_keys), ("data", lambda t: t.data_keys)):
        config = getattr(recipe, section)
        defaults = type(config)()
        owners: dict[str, list[str]] = {}
        for other in all_tasks():
            for key in keys_of(other):
                owners.setdefault(key, []).append(other.name)
        for key, names in owners.items():
            if task.name not in names and getattr(config, key) != getattr(defaults, key):
                problems.append(f"{section}.{key}: only for model.task: {' or '.join(names)}")
    return problems + task.check_recipe(recipe)


def recipe_from_dict(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a plain dict (as loaded from YAML) into a `Recipe`, or raise `RecipeError`."""
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    if not problems:
        problems += _cross_checks(recipe)
        if not recipe.model.name:
            problems.append("model.name: missing: give a hub id or a local model directory")
        if not recipe.name:
            problems.append("name: missing: give the run a name")
    if problems:
        raise RecipeError(problems, source)
    return recipe


# ---------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a raw recipe dict; values are parsed as YAML."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError([f"--set {item!r}: expected KEY=VALUE, e.g. --set lora.rank=4"], "command line")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError([f"--set {item!r}: value is not valid YAML ({err})"], "command line") from None
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning file and syntax errors into one-line `LorafitError`s."""
    if not path.is_file():
        raise LorafitError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LorafitError(f"{path}: invalid YAML{where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise LorafitError(f"{path}: invalid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file. The run name defaults to the file's stem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
