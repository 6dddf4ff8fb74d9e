"""`model.task: causal-lm`: next-token prediction, for continued pre-training, instruction tuning and chat.

Three data formats, picked by the columns a recipe names: raw text (`data.text_column`, loss on
every token), prompt + completion (`data.prompt_column`, `data.completion_column` or
`data.prompt_template`, loss on the completion only) and chat (`data.messages_column`, rendered
with the chat template, loss on assistant turns). Tokenizing, packing and the loss are in
`lorafit.lm`, decoding in `lorafit.generate`.

Evaluation gives loss, perplexity and the tokens scored; `lorafit eval` adds, for prompt +
completion data, exact match of greedy completions: each prompt is completed greedily (rendered
as in training, batched with left padding) and counts as a match when the completion equals the
reference, both stripped of surrounding whitespace. `lorafit generate` continues a prompt.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Callable

import torch

from lorafit.data import (NEWSGROUPS, default_pad_multiple, eval_order, get_split, hold_out, load_newsgroups, open_hf,
                          split_source)
from lorafit.errors import LorafitError
from lorafit.generate import fit_context, generate_ids, generate_text
from lorafit.lm import (IGNORE, LMSplit, collate_lm, count_targets, encode_prompt_completion, has_chat_template,
                        lm_loss, loss_path, tokenize_lm)
from lorafit.models import model_max_length
from lorafit.recipe import DataConfig
from lorafit.tasks.base import Task, TaskData

# ---------------------------------------------------------------- loading


def lm_format(cfg: DataConfig) -> str:
    if cfg.messages_column:
        return "chat"
    return "prompt-completion" if cfg.prompt_column else "text"


def example_format(example: dict) -> str:
    """The format (see `lm_format`) of an example from `load_lm_data`."""
    return "chat" if "messages" in example else "prompt-completion" if "prompt" in example else "text"


def _lm_rows(cfg: DataConfig) -> dict[str, list[dict]]:
    """Rows (dicts of columns) of the recipe's splits; 20newsgroups rows are {text, label}."""
    if cfg.path == NEWSGROUPS:
        splits, _ = load_newsgroups(cfg)
        return {name: [{"text": t, "label": label} for t, label in zip(split.texts, split.labels)]
                for name, split in splits.items()}
    import datasets

    dataset = open_hf(cfg)
    fmt = lm_format(cfg)
    needed = ({"messages_column": cfg.messages_column} if fmt == "chat" else
              {"prompt_column": cfg.prompt_column, "completion_column": cfg.completion_column}
              if fmt == "prompt-completion" else {"text_column": cfg.text_column})
    rows = {}
    for split in (cfg.train_split, cfg.eval_split, cfg.test_split):
        if split and split not in rows:
            part = get_split(dataset, split, {} if cfg.prompt_template else needed)
            for column, feature in part.features.items():
                if isinstance(feature, datasets.ClassLabel):
                    part = part.cast_column(column, datasets.Value("string"))
            rows[split] = part.to_list()
    return rows


def _lm_example(row: dict, cfg: DataConfig, fmt: str) -> dict | None:
    """Normalize a row to the format's keys; None for an empty text."""
    try:
        if fmt == "chat":
            return {"messages": row[cfg.messages_column]}
        if fmt == "prompt-completion":
            prompt = cfg.prompt_template.format(**row) if cfg.prompt_template else row[cfg.prompt_column]
            return {"prompt": prompt, "completion": str(row[cfg.completion_column])}
    except KeyError as err:
        raise LorafitError(f"data.prompt_template: column {err} not found; columns are {sorted(row)}") from None
    text = (row[cfg.text_column] or "").strip()
    return {"text": text} if text else None


def _lm_examples(rows: list[dict], cfg: DataConfig, fmt: str, split: str) -> list[dict]:
    found = [e for row in rows if (e := _lm_example(row, cfg, fmt)) is not None]
    if not found:
        raise LorafitError(f"data: split {split!r} has no text: data.text_column is empty in every row of "
                           f"{split_source(cfg, split)}")
    return found


def _check_newsgroups_lm_columns(cfg: DataConfig) -> None:
    if cfg.path == NEWSGROUPS:
        for key in ("prompt_column", "completion_column", "text_column"):
            if getattr(cfg, key) not in (None, "text", "label"):
                raise LorafitError(f"data.{key}: 20newsgroups rows have the columns 'text' and 'label'")


def load_lm_data(cfg: DataConfig, seed: int) -> TaskData:
    """The recipe's splits as causal-LM examples (dicts with "text", or "prompt" and "completion", or
    "messages"; empty texts dropped), with the eval hold-out."""
    fmt = lm_format(cfg)
    _check_newsgroups_lm_columns(cfg)
    rows = _lm_rows(cfg)
    examples = lambda split: _lm_examples(rows[split], cfg, fmt, split)  # noqa: E731
    train = examples(cfg.train_split)
    if cfg.eval_split:
        eval_ = examples(cfg.eval_split)
    else:
        keep, held = hold_out(len(train), cfg.eval_fraction, seed)
        train, eval_ = [train[i] for i in keep], [train[i] for i in held]
    test = examples(cfg.test_split) if cfg.test_split else None
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        eval_ = eval_[: cfg.max_eval_samples]
        test = test[: cfg.max_eval_samples] if test is not None else None
    return TaskData(train, eval_, test)


def load_lm_split(cfg: DataConfig, split: str, max_samples: int | None = None) -> list[dict]:
    """One split of the dataset `cfg` names, as causal-LM examples (see `load_lm_data`), for scoring a
    trained model: only `split` is read (no hold-out); `max_samples` keeps the first N examples, as
    `data.max_eval_samples` does for the test split in training."""
    _check_newsgroups_lm_columns(cfg)
    only = dataclasses.replace(cfg, train_split=split, eval_split=None, test_split=None)
    examples = _lm_examples(_lm_rows(only)[split], only, lm_format(only), split)
    return examples[:max_samples] if max_samples else examples


# ---------------------------------------------------------------- scoring


@torch.inference_mode()
def lm_sums(model, split: LMSplit, indices: list[int], batch_size: int, pad_id: int,
            device: torch.device | str = "cpu", autocast=nullcontext, on_batch=None) -> tuple[float, int]:
    """The summed next-token loss over the labelled tokens of the examples `indices` of `split`, and
    how many tokens that is; `on_batch(n)` reports progress."""
    was_training = model.training
    model.eval()
    total_loss, total_targets = 0.0, 0
    multiple, cap = default_pad_multiple(device), max(split.lengths, default=0)
    for rows in eval_order([split.lengths[i] for i in indices], batch_size):
        chosen = [indices[r] for r in rows]
        batch = {k: v.to(device) for k, v in collate_lm(split, chosen, pad_id, multiple, cap).items()}
        with autocast():
            total_loss += lm_loss(model, batch).item()
        total_targets += count_targets(batch)
        if on_batch:
            on_batch(len(rows))
    model.train(was_training)
    return total_loss, total_targets


def lm_metrics(total_loss: float, total_targets: int) -> dict[str, float]:
    loss = total_loss / max(total_targets, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_targets}


def evaluate_lm(model, split: LMSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                autocast=nullcontext, on_batch=None) -> dict[str, float]:
    """Mean next-token loss over the labelled tokens of `split`, and its perplexity."""
    every = list(range(len(split)))
    return lm_metrics(*lm_sums(model, split, every, batch_size, pad_id, device, autocast, on_batch))


# Greedy completions may run this many tokens past the longest reference: room for the end token
# and for a text spelled with more tokens than the reference's own tokenization. A completion that
# has not ended by then is longer than any reference, so it could not match anyway.
EXTRA_NEW_TOKENS = 16


def exact_match(lm, examples: list[dict], use_chat_template: bool, batch_size: int,
                device: torch.device | str = "cpu", autocast=nullcontext, on_batch=None) -> tuple[float, list[dict], int]:
    """Complete each prompt greedily and compare with its reference completion.

    Prompts are rendered and truncated as training does (`lm.encode_prompt_completion` with
    `lm.max_length`: a long prompt loses its start).

    Args:
        lm: a loaded `inference.TrainedModel`.
        examples: prompt + completion examples ({"prompt", "completion"}) from `load_lm_split`.
        use_chat_template: render prompts with the chat template, as training did.
        batch_size: prompts per generation batch (sorted by length, left-padded).

    Returns:
        (exact-match accuracy, one {"prompt", "reference", "generated", "match"} per example in
        order, the most new tokens generated per prompt: the longest reference + EXTRA_NEW_TOKENS).
    """
    tokenizer = lm.tokenizer
    prompts = []
    for e in examples:
        # The prompt as training rendered and truncated it: the unlabelled head of the example.
        ids, labels = encode_prompt_completion(tokenizer, e["prompt"], e["completion"], lm.max_length,
                                               use_chat_template)
        prompts.append(ids[:next((i for i, label in enumerate(labels) if label != IGNORE), len(ids))])
    empty = next((i for i, ids in enumerate(prompts) if not ids), None)
    if empty is not None:
        raise LorafitError(f"data: example {empty} has an empty prompt; exact match needs a prompt to complete")
    budget = EXTRA_NEW_TOKENS + max(len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"])
                                    for e in examples)
    fitted = [fit_context(ids, budget, model_max_length(lm.model)) for ids in prompts]
    generated: list[str] = [""] * len(examples)
    for indices in eval_order([len(ids) for ids, _ in fitted], batch_size):
        new_tokens = min(fitted[i][1] for i in indices)  # no row may run past the model's context
        outputs = generate_ids(lm.model, tokenizer, [fitted[i][0] for i in indices], new_tokens, temperature=0.0,
                               device=device, autocast=autocast)
        for i, ids in zip(indices, outputs):
            generated[i] = tokenizer.decode(ids, skip_special_tokens=True)
        if on_batch:
            on_batch(len(indices))
    rows = [{"prompt": e["prompt"], "reference": e["completion"], "generated": text,
             "match": text.strip() == e["completion"].strip()} for e, text in zip(examples, generated)]
    return sum(r["match"] for r in rows) / len(rows), rows, budget


# ---------------------------------------------------------------- the task


class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"
    generates = True
    data_keys = ("prompt_column", "completion_column", "messages_column", "prompt_template", "packing")
    eval_metrics = ("perplexity",)

    def claims(self, config: dict) -> bool:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])

    def load_data(self, cfg, seed: int) -> TaskData:
        return load_lm_data(cfg, seed)

    def load_split(self, cfg, split: str, labels: list[str] | None, max_samples: int | None = None) -> list[dict]:
        return load_lm_split(cfg, split, max_samples)

    def tokenize(self, examples: list[dict], tokenizer, cfg, max_length: int, train: bool = False) -> LMSplit:
        return tokenize_lm(examples, tokenizer, max_length, lm_format(cfg), cfg.use_chat_template,
                           packing=cfg.packing and train, cache=cfg.cache)

    def check_split(self, name: str, examples: list[dict], split: LMSplit, cfg) -> list[str]:
        if not len(split):
            source = {"train": cfg.train_split, "eval": cfg.eval_split, "test": cfg.test_split}[name] \
                or cfg.train_split  # eval held out of train
            raise LorafitError(f"data: split {source!r} has no example left: none of the {split.dropped} in "
                               f"{split_source(cfg, source)} has a token to learn after truncation to "
                               f"{cfg.max_length} tokens (data.max_length)")
        notes = []
        if split.dropped:
            notes.append(f"{name}: dropped {split.dropped} examples with no tokens to learn after truncation to "
                         f"{cfg.max_length}")
        if split.segments is not None:
            notes.append(f"packed {len(examples)} training examples into {len(split)} blocks")
        return notes

    def collate(self, split: LMSplit, indices: list[int], pad_id: int, multiple: int = 1,
                cap: int | None = None) -> dict[str, torch.Tensor]:
        return collate_lm(split, indices, pad_id, multiple, cap)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch)

    def prepare(self, model) -> list[str]:
        return [loss_path(model).note]

    def loss(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        return lm_loss(model, batch)

    def evaluate(self, model, split: LMSplit, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
                 autocast: Callable = nullcontext, on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
        return evaluate_lm(model, split, batch_size, pad_id, device, autocast, on_batch)

    def evaluate_share(self, model, split: LMSplit, indices: list[int], batch_size: int, pad_id: int,
                       device: torch.device | str = "cpu", autocast: Callable = nullcontext) -> tuple[float, int]:
        """The share's summed loss and target count (`lm_sums`)."""
        return lm_sums(model, split, indices, batch_size, pad_id, device, autocast)

    def reduce_eval(self, split: LMSplit, shares: list[tuple[float, int]]) -> dict[str, float]:
        return lm_metrics(sum(loss for loss, _ in shares), sum(targets for _, targets in shares))

    def probe_batch(self, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        from lorafit.merge import text_probe_batch

        return text_probe_batch(tokenizer, max_length)

    def eval_report(self, trained, examples: list[dict], split: str, batch_size: int, device: torch.device,
                    autocast: Callable, console) -> dict:
        """"loss" (mean next-token cross-entropy over the labelled tokens), "perplexity" (exp of the
        loss), "tokens" (how many were scored), "dropped" (examples with no token left to score after
        truncation); for prompt + completion data also "exact_match" and the "generations" it counted."""
        from lorafit.generate import renders_chat
        from lorafit.inference import progress_bar

        fmt = example_format(examples[0])
        chat = renders_chat(trained)
        tokens = tokenize_lm(examples, trained.tokenizer, trained.max_length, fmt, chat)
        if not len(tokens):
            raise LorafitError(f"data: no example of split {split!r} has a token left to score after truncation "
                               f"to {trained.max_length} tokens")
        with progress_bar(console, f"eval {split}", len(tokens)) as advance:
            metrics = evaluate_lm(trained.model, tokens, batch_size, trained.tokenizer.pad_token_id, device,
                                  autocast, on_batch=advance)
        scores = {}
        if fmt == "prompt-completion":
            with progress_bar(console, f"generate {split}", len(examples)) as advance:
                accuracy, rows, budget = exact_match(trained, examples, chat, batch_size, device, autocast,
                                                     on_batch=advance)
            scores = {"exact_match": accuracy, "max_new_tokens": budget, "generations": rows}
        return {"format": fmt, "examples": len(examples), "dropped": tokens.dropped, "chat_template": chat,
                **metrics, **scores}

    def report_table(self, report: dict):
        from rich.table import Table

        table = Table(title=f"{report['split']} ({report['examples']} examples)", show_header=False)
        table.add_row("loss", f"{report['loss']:.4f}")
        table.add_row("perplexity", f"{report['perplexity']:.4f}")
        table.add_row("tokens scored", str(report["tokens"]))
        if "exact_match" in report:
            table.add_row("exact match", f"{report['exact_match']:.4f}")
        return table

    def generate(self, trained, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 num_beams: int = 1, on_text: Callable[[str], None] | None = None, **options) -> str:
        """Options: `use_chat_template` (None: as in training, see `generate.generate_text`)."""
        if num_beams != 1:
            raise LorafitError(f"--num-beams {num_beams}: {self.name} models decode greedily or by sampling; "
                               f"leave out --num-beams")
        return generate_text(trained, prompt, max_new_tokens, temperature, top_p, options.get("use_chat_template"),
                             on_text)
