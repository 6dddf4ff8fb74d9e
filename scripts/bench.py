"""Side-by-side training throughput: lorafit vs PEFT + a plain PyTorch loop, on the same job.

Each measurement runs in its own process (so peak RSS is per run) and the contenders alternate
round by round, so machine drift hits all of them alike. Reported: non-padding tokens/s and
samples/s over the steady-state steps (after `--warmup` steps), peak RSS, the ratio
lorafit / PEFT per round (median over rounds), and lorafit's achieved matmul FLOP/s as a
fraction of this machine's measured matmul peak in the same precision.

Contenders:
- peft:       get_peft_model + AdamW, random batches padded to their longest, fp32 (PEFT's default on CPU);
- peft-tuned: the same with bf16 autocast and length-grouped batches (what a PEFT power user would do);
- lorafit:    `lorafit train` with the recipe's defaults (length-grouped batches, precision auto),
              or with `--same-settings` PEFT's exact batches and fp32.

Jobs (--task): newsgroups (MiniLM sequence classification) and smollm2 (causal LM) run their
recipes in configs/. seq2seq and token-classification have no recipe here; the script writes one
(lorafit's defaults plus the job's data, LoRA and batch) and its data, passages of 20 Newsgroups'
training posts (see `newsgroups_passages`):
- seq2seq: Marian en-de's shapes with random weights (scripts/random_model.py; no pretrained
  copy is offline, and MiniLM's WordPiece tokenizer stands in for Marian's sentencepiece), built
  once under the lorafit cache; LoRA on q_proj/v_proj (self- and cross-attention), batch 16, 128
  tokens. Source: a passage; target: its words in reverse order, a stand-in translation of the
  same length (throughput depends on lengths, not on what the words mean). Tokens counted, as
  lorafit's log counts them: source tokens (the decoder reads as many again).
- token-classification: the bundled pretrained MiniLM-L6, LoRA on query/value, batch 16, 128 tokens.
  Words: a passage's words and punctuation; tags: IOB2 from the surface form (see `surface_tags`).

    python scripts/bench.py --task newsgroups --steps 40 --rounds 3
    python scripts/bench.py --task newsgroups --steps 40 --rounds 3 --same-settings
    python scripts/bench.py --task smollm2 --steps 12 --rounds 2
    python scripts/bench.py --task seq2seq --steps 30 --warmup 5 --rounds 2
    python scripts/bench.py --task token-classification --steps 60 --warmup 10 --rounds 3
    python scripts/bench.py --time-to-accuracy            # newsgroups recipe, test accuracy >= 0.70
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's lorafit, not whichever the venv has installed
LORA_RANK, LORA_ALPHA = 8, 16  # the throughput jobs' LoRA, on both sides whatever the recipe says
N_EVAL = 8  # eval rows written beside a job's training data (evaluation is off during the measurement)


# ---------------------------------------------------------------- data of the jobs without a recipe


PLAIN_WORD = re.compile(r"[(\"']?[A-Za-z][A-Za-z'-]*[)\"']?[.,;:!?)\"']*")  # a word, maybe quoted or punctuated


def newsgroups_passages(n: int) -> list[str]:
    """The first `n` passages of running text in 20 Newsgroups' training posts (headers, footers
    and quotes removed, as the newsgroups recipe reads them), in post order.

    A passage is whole consecutive sentences of one post, cut once it reaches 48 words; passages
    over 96 words are dropped, and so are sentences where fewer than 80% of the words are plain
    words (code, tables, signatures). About 55-130 WordPiece tokens each (median 80).
    """
    from sklearn.datasets import fetch_20newsgroups

    posts = fetch_20newsgroups(subset="train", remove=("headers", "footers", "quotes"),
                               download_if_missing=False).data
    passages: list[str] = []
    for post in posts:
        words: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(post.split())):
            sentence_words = sentence.split()
            if sum(1 for w in sentence_words if PLAIN_WORD.fullmatch(w)) < 0.8 * len(sentence_words):
                words = []  # a passage never spans code or a table
                continue
            words += sentence_words
            if len(words) >= 48:
                if len(words) <= 96:
                    passages.append(" ".join(words))
                    if len(passages) == n:
                        return passages
                words = []
    raise SystemExit(f"20 Newsgroups has only {len(passages)} passages; ask for fewer steps")


def translation_pairs(n: int) -> list[dict]:
    """Source: a passage; target: its words in reverse order (same tokens, so the same length)."""
    return [{"source": p, "target": " ".join(reversed(p.split()))} for p in newsgroups_passages(n)]


def surface_tags(words: list[str]) -> list[str]:
    """IOB2 tags read off the surface: a run of capitalised words that does not open a sentence is a
    NAME, a word starting with a digit a NUM, anything else O. (Deterministic, so both contenders
    and every round see the same tags; the model learns a real, if easy, pattern.)"""
    tags = []
    for i, word in enumerate(words):
        opens_sentence = i == 0 or words[i - 1] in {".", "!", "?"}
        if word[0].isdigit():
            tags.append("B-NUM")
        elif word[0].isupper() and not opens_sentence and word != "I":
            tags.append("I-NAME" if tags and tags[-1].endswith("NAME") else "B-NAME")
        else:
            tags.append("O")
    return tags


def tagged_words(n: int) -> list[dict]:
    """A passage's words and punctuation marks, each with its `surface_tags` tag."""
    rows = []
    for passage in newsgroups_passages(n):
        words = re.findall(r"\w+(?:['-]\w+)*|[^\w\s]", passage)
        rows.append({"tokens": words, "tags": surface_tags(words)})
    return rows


# ---------------------------------------------------------------- the PEFT side's tokenized rows


def recipe_data(task: str, n: int):
    """The data section of the job's recipe, cut to its first `n` training examples."""
    from lorafit.recipe import load_recipe

    data = load_recipe(ROOT / JOBS[task].recipe).data
    data.max_train_samples = n
    return data


def classification_rows(task: str, tokenizer, n: int, max_length: int) -> tuple[list[dict], list[str]]:
    from lorafit.tasks.classification import load_classification_data

    data = load_classification_data(recipe_data(task, n), seed=42)
    ids = tokenizer(data.train.texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, data.train.labels)], data.labels


def causal_lm_rows(task: str, tokenizer, n: int, max_length: int) -> tuple[list[dict], None]:
    from lorafit.tasks.causal_lm import load_lm_data

    texts = [e["text"] for e in load_lm_data(recipe_data(task, n), seed=42).train]
    ids = [x + [tokenizer.eos_token_id] for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return [{"input_ids": x, "labels": x} for x in ids], None


def seq2seq_rows(task: str, tokenizer, n: int, max_length: int) -> tuple[list[dict], None]:
    pairs = translation_pairs(n)
    enc = tokenizer([p["source"] for p in pairs], text_target=[p["target"] for p in pairs], truncation=True,
                    max_length=max_length)
    return [{"input_ids": x, "labels": y} for x, y in zip(enc["input_ids"], enc["labels"])], None


def token_classification_rows(task: str, tokenizer, n: int, max_length: int) -> tuple[list[dict], list[str]]:
    """Tags on the first sub-word of each word, -100 elsewhere (transformers' token-classification
    example, and lorafit's default)."""
    examples = tagged_words(n)
    names = sorted({tag for e in examples for tag in e["tags"]})
    enc = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, truncation=True, max_length=max_length)
    rows = []
    for i, example in enumerate(examples):
        words = enc.word_ids(i)
        labels = [-100 if w is None or (j > 0 and words[j - 1] == w) else names.index(example["tags"][w])
                  for j, w in enumerate(words)]
        rows.append({"input_ids": enc["input_ids"][i], "labels": labels})
    return rows, names


def pad_rows(rows: list[dict], pad_id: int) -> dict:
    """A batch padded on the right to its longest row, as transformers' collators pad: input_ids
    with the pad id, per-token labels with -100; attention_mask marks the real tokens; one label
    per row stacks."""
    import torch

    def pad(seqs: list[list[int]], value: int):
        width = max(map(len, seqs))
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    ids = [r["input_ids"] for r in rows]
    labels = [r["labels"] for r in rows]
    return {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(x) for x in ids], 0),
            "labels": pad(labels, -100) if isinstance(labels[0], list) else torch.tensor(labels)}


# ---------------------------------------------------------------- the jobs


@dataclass(frozen=True)
class Job:
    """One throughput job: what both sides train, with the same LoRA and batches."""

    task: str
    """lorafit's model.task."""
    auto_class: str
    """The transformers class the PEFT contenders load the model with."""
    peft_task_type: str
    targets: tuple[str, ...]
    """LoRA target modules, on both sides."""
    lora_dropout: float
    """The PEFT contenders' LoRA dropout (lorafit takes the recipe's, or this in a written recipe)."""
    batch_size: int
    max_length: int
    peft_rows: Callable
    """(task, tokenizer, n, max_length) -> (tokenized rows, label names or None), for the PEFT contenders."""
    recipe: str | None = None
    """The recipe lorafit runs; None: the script writes one (`written_recipe`)."""
    model: str | None = None
    """The base model of a job without a recipe."""
    data: Callable[[int], list[dict]] | None = None
    """The first n raw rows of a job without a recipe, written as JSON lines for lorafit."""
    columns: dict | None = None
    """The written recipe's data.* column keys."""


JOBS = {
    "newsgroups": Job("sequence-classification", "AutoModelForSequenceClassification", "SEQ_CLS",
                      ("query", "value"), 0.1, 16, 256, classification_rows, recipe="configs/newsgroups.yaml"),
    "smollm2": Job("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM", ("q_proj", "v_proj"), 0.0, 8, 256,
                   causal_lm_rows, recipe="configs/smollm2-newsgroups-lm.yaml"),
    "seq2seq": Job("seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", ("q_proj", "v_proj"), 0.1, 16, 128,
                   seq2seq_rows, model="Helsinki-NLP/opus-mt-en-de", data=translation_pairs,
                   columns={"source_column": "source", "target_column": "target"}),
    "token-classification": Job("token-classification", "AutoModelForTokenClassification", "TOKEN_CLS",
                                ("query", "value"), 0.1, 16, 128, token_classification_rows,
                                model="sentence-transformers/all-MiniLM-L6-v2", data=tagged_words,
                                columns={"tokens_column": "tokens", "tags_column": "tags"}),
}


def base_model_name(task: str, model: str | None) -> str:
    """`model` if given; else the recipe's model; else the job's, as a random-weight copy built once
    under the lorafit cache when scripts/random_model.py stands in for it (Marian en-de)."""
    job = JOBS[task]
    if model:
        return model
    if job.recipe:
        return yaml.safe_load((ROOT / job.recipe).read_text())["model"]["name"]
    from random_model import STAND_INS, write_random_model

    from lorafit.cache import cache_root

    if job.model not in STAND_INS:
        return job.model
    folder = cache_root() / "bench" / (job.model.replace("/", "--") + "-random")
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(write_random_model(job.model, str(partial)), flush=True)
        partial.rename(folder)  # whole or absent: a killed build leaves only the .partial folder
    return str(folder)


def written_recipe(task: str, folder: Path, n: int, model: str) -> Path:
    """The recipe of a job with none in configs/: lorafit's defaults, the job's model, task, LoRA
    dropout and data. The data goes to `folder` as JSON lines: n training rows and N_EVAL eval rows."""
    job = JOBS[task]
    rows = job.data(n + N_EVAL)
    files = {"train": rows[:n], "eval": rows[n:]}
    for split, part in files.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = {"name": f"bench-{task}", "seed": 42, "model": {"name": model, "task": job.task},
              "lora": {"dropout": job.lora_dropout},
              "data": {"path": "json", "data_files": {s: str(folder / f"{s}.jsonl") for s in files},
                       "eval_split": "eval", "test_split": None, **job.columns}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_base_model(job: Job, source, labels: list[str] | None):
    """The base model as a PEFT user loads it: fp32, the checkpoint's own dropout, a fresh head for `labels`."""
    import torch
    import transformers

    from lorafit.models import drop_gguf_quantizer

    heads = ({"num_labels": len(labels), "id2label": dict(enumerate(labels)),
              "label2id": {name: i for i, name in enumerate(labels)}} if labels else {})
    model = getattr(transformers, job.auto_class).from_pretrained(source.path, dtype=torch.float32, **source.kwargs,
                                                                  **heads)
    drop_gguf_quantizer(model)  # SmolLM2's bundled GGUF, dequantized: a plain fp32 model, as lorafit trains
    return model


# ---------------------------------------------------------------- workers (one per process)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker_peft(task: str, steps: int, warmup: int, tuned: bool, model_name: str | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lorafit.data import batch_order
    from lorafit.device import pick_device
    from lorafit.models import load_tokenizer, resolve_model

    job = JOBS[task]
    torch.manual_seed(0)
    device = pick_device()
    source = resolve_model(base_model_name(task, model_name))
    tokenizer = load_tokenizer(source)
    rows, labels = job.peft_rows(task, tokenizer, steps * job.batch_size, job.max_length)
    config = LoraConfig(task_type=job.peft_task_type, r=LORA_RANK, lora_alpha=LORA_ALPHA,
                        lora_dropout=job.lora_dropout, target_modules=list(job.targets))
    model = get_peft_model(load_base_model(job, source, labels), config).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    order = batch_order([len(r["input_ids"]) for r in rows], job.batch_size, 42, 0, group_by_length=tuned)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if tuned else torch.enable_grad
    tokens = samples = 0
    start = None
    for step, batch_ids in enumerate(order[:steps]):
        if step == warmup:
            synchronize(device)
            start, tokens, samples = time.perf_counter(), 0, 0
        batch = pad_rows([rows[i] for i in batch_ids], tokenizer.pad_token_id)
        tokens += int(batch["attention_mask"].sum())  # what lorafit's log counts: the inputs' real tokens
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss  # the model's own loss on its labels, as Trainer takes it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(batch_ids)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds, **device_info(device)}


def device_info(device) -> dict:
    """Where a worker ran; on a GPU also its peak allocated memory (RSS alone would miss it)."""
    import torch

    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        info["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return info


def throughput_overrides(task: str, steps: int, batch_size: int | None = None) -> list[str]:
    """The recipe overrides of a throughput job: `steps` steps of the job's batch (`batch_size` per
    process where several share it), the job's LoRA and lengths, no evaluation, checkpoint or test
    split, a log line per step."""
    job = JOBS[task]
    return [f"train.max_steps={steps}", f"data.max_train_samples={steps * job.batch_size}",
            f"train.batch_size={batch_size or job.batch_size}", f"lora.target_modules=[{','.join(job.targets)}]",
            f"data.max_length={job.max_length}", f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}",
            f"data.max_eval_samples={N_EVAL}", "data.test_split=null", "train.eval_every=null",
            "train.save_every=null", "train.eval_at_start=false", "train.log_every=1"]


def steady_throughput(lines: list[dict], warmup: int, batch_size: int) -> tuple[float, float]:
    """(tokens/s, samples/s) over the steps after `warmup`, from metrics.jsonl lines logged every
    step with `batch_size` samples (all processes together) each."""
    steady = [m for m in lines if "split" not in m and m["step"] > warmup]
    # Each line covers one step: its time is samples / (samples/s).
    seconds = sum(batch_size / m["samples_per_s"] for m in steady)
    tokens = sum(m["tokens_per_s"] * batch_size / m["samples_per_s"] for m in steady)
    return tokens / seconds, batch_size * len(steady) / seconds


def worker_lorafit(task: str, steps: int, warmup: int, same_settings: bool, model_name: str | None) -> dict:
    import io

    from rich.console import Console

    from lorafit.recipe import load_recipe
    from lorafit.device import pick_device
    from lorafit.train import train

    job = JOBS[task]
    overrides = throughput_overrides(task, steps)
    if same_settings:
        overrides += ["train.precision=fp32", "train.group_by_length=false", "model.dropout=null",
                      "model.attention_dropout=null"]
    if model_name:
        overrides.append(f"model.name={model_name}")
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = (ROOT / job.recipe if job.recipe
                       else written_recipe(task, Path(tmp), steps * job.batch_size, base_model_name(task, model_name)))
        recipe = load_recipe(recipe_path, [*overrides, f"train.output_dir={tmp}/run"])
        train(recipe, console=Console(file=log, width=1000))  # one line per message, for `picked`
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s, samples_per_s = steady_throughput(lines, warmup, job.batch_size)
    # The run's own "device ..., precision ..." line: what lorafit picked with no recipe change.
    picked = next((line.strip() for line in log.getvalue().splitlines() if line.startswith("device ")), "")
    return {"tokens_per_s": tokens_per_s, "samples_per_s": samples_per_s, "picked": picked,
            **device_info(pick_device())}


# ---------------------------------------------------------------- time to accuracy (newsgroups)


def train_seconds_until(lines: list[dict], step: int, batch_size: int) -> float:
    """Training time up to `step` from metrics.jsonl lines, evaluation excluded: each log line's
    window lasted (its steps x batch_size) / samples_per_s."""
    seconds, previous = 0.0, 0
    for m in lines:
        if "split" not in m and m["step"] <= step:
            seconds += (m["step"] - previous) * batch_size / m["samples_per_s"]
            previous = m["step"]
    return seconds


def worker_tta_lorafit(eval_every: int, target: float) -> dict:
    """`lorafit train configs/newsgroups.yaml` as a user runs it, plus a test evaluation every `eval_every` steps."""
    from rich.console import Console

    from lorafit.recipe import load_recipe
    from lorafit.train import train

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(ROOT / "configs/newsgroups.yaml",
                             [f"train.eval_every={eval_every}", "train.eval_splits=[test]", "train.save_every=null",
                              f"train.output_dir={tmp}/run"])
        start = time.perf_counter()
        train(recipe, console=Console(quiet=True))
        wall = time.perf_counter() - start
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], m["accuracy"]) for m in lines if m.get("split") == "test"]
    curve = sorted(dict(curve).items())  # the final evaluation may repeat the last step
    batch_size = recipe.train.batch_size
    hit = next((step for step, acc in curve if acc >= target), None)
    return {"curve": [(step, acc, train_seconds_until(lines, step, batch_size)) for step, acc in curve],
            "reached_step": hit, "seconds_to_target": train_seconds_until(lines, hit, batch_size) if hit else None,
            "wall_s": wall}


def worker_tta_peft(eval_every: int, target: float, budget_s: float) -> dict:
    """PEFT + a plain loop on the newsgroups recipe's job: the same data, LoRA targets, rank, alpha,
    LoRA dropout, optimizer, schedule, batch size and epochs, with PEFT's defaults for the rest (fp32,
    random batches padded to their longest, the model's own dropout). Stops at `target` test accuracy
    or after `budget_s` seconds of training. Test accuracy comes from lorafit's evaluator under bf16
    autocast for both contenders (evaluation time is not counted)."""
    import functools

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, TaskType, get_peft_model

    from lorafit.data import batch_order, steps_per_epoch
    from lorafit.models import load_model, load_tokenizer, resolve_model
    from lorafit.recipe import load_recipe
    from lorafit.device import autocast_for
    from lorafit.tasks.classification import SequenceClassification, collate, load_classification_data, tokenize
    from lorafit.train import lr_lambda

    recipe = load_recipe(ROOT / "configs/newsgroups.yaml")
    torch.manual_seed(recipe.seed)
    data = load_classification_data(recipe.data, recipe.seed)
    source = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, "sequence-classification", tokenizer, data.labels)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=recipe.lora.rank,
                                             lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                                             target_modules=recipe.lora.target_modules))
    train_split = tokenize(data.train, tokenizer, recipe.data.max_length, cache=True)
    test_split = tokenize(data.test, tokenizer, recipe.data.max_length, cache=True)
    cfg = recipe.train
    total = cfg.epochs * steps_per_epoch(len(train_split), cfg.batch_size, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.optim.lr,
                                  weight_decay=recipe.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_lambda, warmup_steps=round(recipe.optim.warmup_ratio * total), total_steps=total, kind="linear"))
    bf16 = autocast_for(torch.device("cpu"), torch.bfloat16)
    curve, seconds, step, hit = [], 0.0, 0, None
    model.train()
    for epoch in range(cfg.epochs):
        for batch_ids in batch_order(train_split.lengths, cfg.batch_size, recipe.seed, epoch, group_by_length=False):
            start = time.perf_counter()
            batch = collate(train_split, batch_ids, tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            F.cross_entropy(logits, batch["labels"], label_smoothing=cfg.label_smoothing).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            step += 1
            if step % eval_every == 0 or step == total or seconds >= budget_s:
                accuracy = SequenceClassification().evaluate(model, test_split, 64, tokenizer.pad_token_id, "cpu", bf16)["accuracy"]
                curve.append((step, accuracy, seconds))
                print(f"peft step {step}: test accuracy {accuracy:.4f} after {seconds / 60:.1f} min", file=sys.stderr,
                      flush=True)
                if accuracy >= target:
                    hit = step
                if hit or seconds >= budget_s:
                    return {"curve": curve, "reached_step": hit, "seconds_to_target": seconds if hit else None}
    return {"curve": curve, "reached_step": None, "seconds_to_target": None}


def time_to_accuracy(args) -> None:
    common = ["--eval-every", str(args.eval_every), "--target", str(args.target)]
    if args.peft_budget_minutes:  # only PEFT, against a lorafit time measured before
        peft = run_worker(["tta-peft", str(60 * args.peft_budget_minutes)], common, show_progress=True)
        print(json.dumps(peft))
        return
    lorafit = run_worker(["tta-lorafit"], common)
    print(json.dumps(lorafit))
    for step, acc, seconds in lorafit["curve"]:
        print(f"lorafit step {step:5d}: test accuracy {acc:.4f} after {seconds / 60:5.1f} min of training", flush=True)
    if lorafit["seconds_to_target"] is None:
        print(f"lorafit did not reach {args.target}; no comparison", flush=True)
        return
    lf = lorafit["seconds_to_target"]
    print(f"lorafit reached {args.target} at step {lorafit['reached_step']} after {lf / 60:.1f} min of training "
          f"({lorafit['wall_s'] / 60:.1f} min wall for the whole recipe, evaluations included)", flush=True)
    budget = args.budget_factor * lf
    peft = run_worker(["tta-peft", str(budget)], common, show_progress=True)
    for step, acc, seconds in peft["curve"]:
        print(f"peft    step {step:5d}: test accuracy {acc:.4f} after {seconds / 60:5.1f} min of training")
    if peft["seconds_to_target"] is None:
        print(f"PEFT did not reach {args.target} within {budget / 60:.1f} min ({args.budget_factor:g}x lorafit's "
              f"time): lorafit's time to {args.target} is below 1/{args.budget_factor:g} of PEFT's")
    else:
        print(f"PEFT reached {args.target} after {peft['seconds_to_target'] / 60:.1f} min: "
              f"lorafit / PEFT time = {lf / peft['seconds_to_target']:.2f}")


def worker_peak(dtype: str) -> dict:
    """Matmul peak of this machine in `dtype`: the best of a few large square matmuls."""
    import torch

    from lorafit.device import pick_device

    device = pick_device()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    best = 0.0
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return {"flops": best}


# ---------------------------------------------------------------- driver


def run_worker(worker: list[str], common: list[str], show_progress: bool = False) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, __file__, *common, "--worker", *worker], stdout=subprocess.PIPE,
                         stderr=None if show_progress else subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"worker {worker} failed:\n{(out.stderr or '')[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_flops_per_token(task: str, model_name: str | None) -> float:
    """Training matmul FLOPs per counted token with frozen base weights: forward 2·P, input
    gradients 2·P (no weight gradients for frozen layers), P the parameters of the Linears a token
    passes. Attention-score matmuls are left out, so the fraction is a lower bound. In an
    encoder-decoder a source token passes the encoder's Linears and a target token the decoder's
    and the LM head; the seq2seq job's source and target are the same tokens reordered (equal
    counts), so a counted token passes half of them on average."""
    import torch

    from lorafit.models import resolve_model

    job = JOBS[task]
    source = resolve_model(base_model_name(task, model_name))
    labels = ["a", "b"] if job.task in ("sequence-classification", "token-classification") else None
    model = load_base_model(job, source, labels)
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 4.0 * params / (2 if model.config.is_encoder_decoder else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(JOBS), default="newsgroups")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--same-settings", action="store_true")
    parser.add_argument("--time-to-accuracy", action="store_true",
                        help="newsgroups recipe: training time until test accuracy >= --target, lorafit vs PEFT")
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--peft-budget-minutes", type=float,
                        help="run only the PEFT side, for at most this many minutes of training")
    parser.add_argument("--eval-every", type=int, default=224, help="steps between test evaluations")
    parser.add_argument("--budget-factor", type=float, default=3.0,
                        help="PEFT trains at most this many times lorafit's time to the target")
    parser.add_argument("--model", help="base model (hub name or local directory) instead of the job's, for "
                        "every contender")
    parser.add_argument("--json", type=Path, help="also write every round's results here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()

    if args.worker:
        kind, *rest = args.worker
        if kind == "peak":
            result = worker_peak(rest[0])
        elif kind == "tta-lorafit":
            result = worker_tta_lorafit(args.eval_every, args.target)
        elif kind == "tta-peft":
            result = worker_tta_peft(args.eval_every, args.target, float(rest[0]))
        elif kind == "lorafit":
            result = worker_lorafit(args.task, args.steps, args.warmup, rest == ["same"], args.model)
        else:
            result = worker_peft(args.task, args.steps, args.warmup, kind == "peft-tuned", args.model)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    if args.time_to_accuracy:
        time_to_accuracy(args)
        return
    contenders = {"lorafit": ["lorafit", "same" if args.same_settings else "default"], "peft": ["peft"],
                  "peft-tuned": ["peft-tuned"]}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    common = ["--task", args.task, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if not JOBS[args.task].recipe:  # its model may be a random copy, built here once for every worker
        args.model = base_model_name(args.task, args.model)
    if args.model:
        common += ["--model", args.model]
    for round_ in range(args.rounds):
        for name, worker in contenders.items():
            results[name].append(run_worker(worker, common))
            r = results[name][-1]
            gpu = f" peak GPU memory {r['peak_gpu_mb']:6.0f} MB" if "peak_gpu_mb" in r else ""
            print(f"round {round_ + 1} {name:10s} {r['tokens_per_s']:8.1f} tok/s {r['samples_per_s']:6.2f} samples/s "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB{gpu} on {r['device']}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    if results["lorafit"][0].get("picked"):
        print(f"lorafit picked, with no recipe change: {results['lorafit'][0]['picked']}")

    precision = "fp32" if args.same_settings else "bf16"
    peak = run_worker(["peak", precision], [])["flops"]
    print(f"\n{args.task}, {'--same-settings' if args.same_settings else 'lorafit defaults'}, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds; medians:")
    gpu = "peak_gpu_mb" in results["lorafit"][0]
    print(f"{'':12s} {'tok/s':>8s} {'samples/s':>10s} {'peak RSS MB':>12s}" + (f" {'peak GPU MB':>12s}" if gpu else "")
          + f" {'lorafit / this':>15s}")
    for name, runs in results.items():
        ratios = [lf["tokens_per_s"] / r["tokens_per_s"] for lf, r in zip(results["lorafit"], runs)]
        gpu_mb = f" {statistics.median(r['peak_gpu_mb'] for r in runs):12.0f}" if gpu else ""
        print(f"{name:12s} {statistics.median(r['tokens_per_s'] for r in runs):8.1f} "
              f"{statistics.median(r['samples_per_s'] for r in runs):10.2f} "
              f"{statistics.median(r['peak_rss_mb'] for r in runs):12.0f}{gpu_mb} {statistics.median(ratios):14.2f}x")
    # Matmul work actually done covers padding too; lorafit's padding is small with grouped batches.
    flops_per_token = matmul_flops_per_token(args.task, args.model)
    achieved = statistics.median(r["tokens_per_s"] for r in results["lorafit"]) * flops_per_token
    print(f"lorafit matmul FLOP/s (non-padding tokens x 4 x linear params): {achieved / 1e9:.1f} GFLOP/s = "
          f"{100 * achieved / peak:.1f}% of this machine's {precision} matmul peak ({peak / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
