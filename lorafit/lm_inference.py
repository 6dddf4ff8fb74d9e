"""`lorafit eval` for causal LMs: loss and perplexity on a split, and exact match of greedy completions.

Scoring runs as training's evaluation does: the recipe's data section read by
`data.load_lm_split`, tokenized by `lm.tokenize_lm` (same truncation, chat-template rendering and
loss masks), scored by `evaluate.evaluate_lm` on the same device, at the same precision
(`resolve_precision`/`autocast_for`), in the same length-sorted eval batches. So scoring a run's
adapter on its test split reproduces the test loss and perplexity in the run's metrics.jsonl.

Prompt + completion data also has references: each prompt is completed greedily (rendered as in
training, batched with left padding) and the completion counts as an exact match when it equals
the reference, both stripped of surrounding whitespace.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafit.data import eval_order, lm_format, load_lm_split
from lorafit.errors import LorafitError
from lorafit.evaluate import evaluate_lm
from lorafit.generate import fit_context, generate_ids
from lorafit.inference import CausalLM, EvalResult, default_report_path, eval_data, load_causal_lm
from lorafit.io import write_json
from lorafit.lm import IGNORE, encode_prompt_completion, has_chat_template, tokenize_lm
from lorafit.models import model_max_length
from lorafit.device import autocast_for, pick_device, resolve_precision

# Greedy completions may run this many tokens past the longest reference: room for the end token
# and for a text spelled with more tokens than the reference's own tokenization. A completion that
# has not ended by then is longer than any reference, so it could not match anyway.
EXTRA_NEW_TOKENS = 16


def exact_match(lm: CausalLM, examples: list[dict], use_chat_template: bool, batch_size: int,
                device: torch.device | str = "cpu", autocast=nullcontext, on_batch=None) -> tuple[float, list[dict], int]:
    """Complete each prompt greedily and compare with its reference completion.

    Prompts are rendered and truncated as training does (`lm.encode_prompt_completion` with
    `lm.max_length`: a long prompt loses its start).

    Args:
        examples: prompt + completion examples ({"prompt", "completion"}) from `data.load_lm_split`.
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


def lm_metrics_table(report: dict) -> Table:
    table = Table(title=f"{report['split']} ({report['examples']} examples)", show_header=False)
    table.add_row("loss", f"{report['loss']:.4f}")
    table.add_row("perplexity", f"{report['perplexity']:.4f}")
    table.add_row("tokens scored", str(report["tokens"]))
    if "exact_match" in report:
        table.add_row("exact match", f"{report['exact_match']:.4f}")
    return table


def run_lm_eval(path: Path, recipe_path: Path | None = None, split: str | None = None, data_files: str | None = None,
                max_samples: int | None = None, base: str | None = None, output: Path | None = None,
                console: Console | None = None) -> EvalResult:
    """Score a causal LM (run, adapter or merged model) on a split; write a JSON report.

    Data defaults to the recipe's test split, first `data.max_eval_samples` examples (as training
    scores it); `split`, `data_files` (read with the recipe's columns) and `max_samples` override.
    The report holds "loss" (mean next-token cross-entropy over the labelled tokens), "perplexity"
    (exp of the loss), "tokens" (how many were scored) and "dropped" (examples with no token left
    to score after truncation); for prompt + completion data also "exact_match" and the
    "generations" it counted. `output` defaults to `inference.default_report_path`.
    """
    console = console or Console()
    if max_samples is not None and max_samples < 1:
        raise LorafitError(f"--max-samples {max_samples}: use a positive number")
    lm = load_causal_lm(path, base, recipe_path)
    data_cfg, split = eval_data(lm, split, data_files)
    if max_samples is None and data_files is None and lm.recipe is not None:
        max_samples = lm.recipe.data.max_eval_samples
    examples = load_lm_split(data_cfg, split, max_samples)
    fmt = lm_format(data_cfg)
    chat = data_cfg.use_chat_template and has_chat_template(lm.tokenizer)
    tokens = tokenize_lm(examples, lm.tokenizer, lm.max_length, fmt, chat)
    if not len(tokens):
        raise LorafitError(f"data: no example of split {split!r} has a token left to score after truncation "
                           f"to {lm.max_length} tokens")
    report_path = Path(output) if output else default_report_path(lm, split)
    if report_path.suffix != ".json":
        raise LorafitError(f"--output {report_path}: the report is JSON; name it *.json")

    cfg = lm.train_config
    device = pick_device()
    dtype = resolve_precision(cfg.precision, device)
    autocast = autocast_for(device, dtype)
    batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
    lm.model.to(device)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    with progress:
        task = progress.add_task(f"eval {split}", total=len(tokens))
        metrics = evaluate_lm(lm.model, tokens, batch_size, lm.tokenizer.pad_token_id, device, autocast,
                              on_batch=lambda n: progress.advance(task, n))
        scores = {}
        if fmt == "prompt-completion":
            task = progress.add_task(f"generate {split}", total=len(examples))
            accuracy, rows, budget = exact_match(lm, examples, chat, batch_size, device, autocast,
                                                 on_batch=lambda n: progress.advance(task, n))
            scores = {"exact_match": accuracy, "max_new_tokens": budget, "generations": rows}
    report = {
        "model": str(path), "kind": lm.kind, "split": split,
        "data": data_cfg.data_files[split] if data_files else data_cfg.path, "format": fmt,
        "examples": len(examples), "dropped": tokens.dropped,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "max_length": lm.max_length,
        "chat_template": chat, **metrics, **scores,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report_path, report)
    console.print(lm_metrics_table(report))
    console.print(f"report in {report_path}")
    return EvalResult(report, report_path)
