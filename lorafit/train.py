"""`lorafit train`: recipe -> base model + LoRA -> training loop -> adapter, checkpoints, metrics.

`train(recipe)` reads top to bottom: prepare the output directory, load data and model, add
LoRA, fit, evaluate, save. The loop's state is a handful of local variables; batches are a pure
function of (seed, epoch), so resuming later only needs the step counter.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import math
import random
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lorafit import cache
from lorafit.adapter import AdapterSpec, load_checkpoint_adapter, peft_modules_to_save, save_adapter
from lorafit.checkpoint import (check_resumable, find_checkpoint, load_training_state, prune_checkpoints,
                                save_checkpoint, set_rng_state)
from lorafit.data import batch_order, default_pad_multiple, steps_per_epoch
from lorafit.device import autocast_for, pick_device, precision_name, resolve_precision
from lorafit.errors import LorafitError, TrainingInterrupted
from lorafit.fast import (SpeedUp, store_frozen_weights, use_fast_attention_dropout, use_fast_dropout,
                          use_fused_gated_mlp, use_fused_rms_norm)
from lorafit.io import write_json
from lorafit.lora import LoraPlan, add_lora, find_modules_to_save, init_lora, use_shared_autocast_copy
from lorafit.lowrank import PRINCIPAL_INITS
from lorafit.models import load_model, load_tokenizer, model_max_length, resolve_model
from lorafit.onednn import bound_onednn_caches
from lorafit.rank_schedule import apply_rank_schedule
from lorafit.recipe import LoraConfig, Recipe, dump_recipe
from lorafit.report import plot_training, with_tensorboard
from lorafit.tasks import Split, Task, TaskData, get_task
from lorafit.unpad import use_unpadded_encoder


# ---------------------------------------------------------------- hardware


def release_free_memory() -> None:
    """Hand memory freed while loading (dequantized or fp32 copies of the weights, raw texts) back
    to the OS before training, so that it does not sit in the heap under the training peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only
    except (OSError, AttributeError):
        pass


def pad_multiple(cfg, device: torch.device) -> int:
    """train.pad_to_multiple_of, or its default for `device` (64 on GPUs, 1 on CPUs)."""
    return cfg.pad_to_multiple_of or default_pad_multiple(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- schedule and optimizer


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then `kind`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Only trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    opt = recipe.optim
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr)
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=0.9)


# ---------------------------------------------------------------- output


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


RUN_FILES = ("metrics.jsonl", "recipe.yaml", "summary.json", "plot.png")
RUN_DIRS = ("adapter", "checkpoints", "tensorboard")


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Create the run directory. A non-empty one is refused, or with `overwrite` cleared of the files a
    run writes (only those: a mistyped --output-dir never loses anything else)."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise LorafitError(f"output directory {path} exists and is not empty; pass --overwrite to replace it, "
                               f"--resume to continue it, or choose another with --output-dir")
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(path / name, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def plan_table(plan: LoraPlan, recipe: Recipe) -> Table:
    table = Table(title="LoRA plan", show_header=False, box=None)
    layers = sorted({t.rsplit(".", 1)[-1] for t in plan.targets})
    table.add_row("adapted layers", f"{len(plan.targets)} ({', '.join(layers)})")
    table.add_row("rank / alpha", f"{recipe.lora.rank} / {recipe.lora.alpha:g}"
                  + (" (rsLoRA)" if recipe.lora.use_rslora else ""))
    if recipe.lora.init != "default":
        table.add_row("init", recipe.lora.init + (" (saved as a plain LoRA of twice the rank)"
                                                  if recipe.lora.init in PRINCIPAL_INITS else ""))
    if recipe.lora.rank_schedule:
        table.add_row("rank schedule", ", ".join(f"step {step}: mean rank {rank:g}"
                                                 for step, rank in sorted(recipe.lora.rank_schedule.items())))
    table.add_row("trained in full", ", ".join(plan.modules_to_save) or "-")
    if plan.not_in_checkpoint:
        table.add_row("not in checkpoint", ", ".join(plan.not_in_checkpoint) + " (random at load: trained in full, "
                      "saved with the adapter)")
    if plan.skipped_targets:
        table.add_row("kept out of LoRA", ", ".join(plan.skipped_targets) + " (inside modules trained in full)")
    table.add_row("trainable params", f"{plan.trainable_params:,} of {plan.total_params:,} "
                  f"({100 * plan.trainable_params / plan.total_params:.2f}%)")
    return table


# ---------------------------------------------------------------- the run


@dataclass
class Setup:
    """Everything `train` builds before the loop starts."""

    model: torch.nn.Module
    tokenizer: object
    plan: LoraPlan
    spec: AdapterSpec
    data: TaskData


def add_recipe_lora(model: torch.nn.Module, lora: LoraConfig, task: str, not_loaded: list[str]) -> LoraPlan:
    """Add the recipe's LoRA to `model` (see `add_lora`), with `not_loaded` the modules whose weights
    the checkpoint lacked (from `load_model`).

    Trained in full besides `lora.modules_to_save`: the modules the checkpoint lacks, whose weights
    are random, and every module PEFT wraps along with those and with the task head (PEFT matches
    names by their ending: `classifier` takes `pre_classifier` too), so that PEFT loads the adapter.
    """
    saved = find_modules_to_save(model, lora.modules_to_save)
    required = peft_modules_to_save(model, saved + not_loaded, task)
    plan = add_lora(model, lora.rank, lora.alpha, lora.target_modules, dropout=lora.dropout,
                    use_rslora=lora.use_rslora, modules_to_save=lora.modules_to_save, required_modules=required)
    plan.not_in_checkpoint = not_loaded
    return plan


def setup(recipe: Recipe, console: Console, checkpoint: Path | None = None) -> Setup:
    """Load data, the base model and its tokenizer; add LoRA, initialized as the recipe says or
    loaded from `checkpoint` (to resume). Nothing is written."""
    seed_everything(recipe.seed)
    source = resolve_model(recipe.model.name, recipe.model.trust_remote_code)
    console.print(f"[bold]model[/] {recipe.model.name} from {source.note}")
    data = get_task(recipe.model.task).load_data(recipe.data, recipe.seed)
    labels = data.labels
    tokenizer = load_tokenizer(source, recipe.model.trust_remote_code)
    model, not_loaded = load_model(source, recipe.model.task, tokenizer, labels, recipe.model.trust_remote_code,
                                   dropout=recipe.model.dropout, attention_dropout=recipe.model.attention_dropout)
    limit = model_max_length(model)
    if limit and recipe.data.max_length > limit:
        raise LorafitError(f"data.max_length: {recipe.data.max_length} is above the model's limit of {limit} tokens; "
                           f"use at most {limit}")
    plan = add_recipe_lora(model, recipe.lora, recipe.model.task, not_loaded)
    if checkpoint is None:
        init_lora(model, recipe.lora.init, recipe.lora.init_iters)
    else:
        load_checkpoint_adapter(model, plan, checkpoint, principal=recipe.lora.init in PRINCIPAL_INITS)
    spec = AdapterSpec(
        base_model=recipe.model.name, task=recipe.model.task, rank=recipe.lora.rank, alpha=recipe.lora.alpha,
        dropout=recipe.lora.dropout, target_modules=recipe.lora.target_modules, modules_to_save=plan.modules_to_save,
        use_rslora=recipe.lora.use_rslora, labels=labels,
        meta={"max_length": recipe.data.max_length, "trust_remote_code": recipe.model.trust_remote_code,
              "recipe": recipe.to_dict()},
    )
    return Setup(model, tokenizer, plan, spec, data)


def tokenize_splits(recipe: Recipe, s: Setup, console: Console) -> dict[str, Split]:
    """Token ids for every split, as the task makes them (from the tokenization cache when
    `data.cache` is on), checked by the task, whose notes go to the log."""
    task = get_task(recipe.model.task)
    named = {"train": s.data.train, "eval": s.data.eval, "test": s.data.test}
    hits_before = cache.lookups["hit"]
    splits = {}
    for name, examples in named.items():
        if examples is not None:
            splits[name] = task.tokenize(examples, s.tokenizer, recipe.data, recipe.data.max_length,
                                         train=name == "train")
            for note in task.check_split(name, examples, splits[name], recipe.data):
                console.print(note)
    if recipe.data.cache:
        hits = cache.lookups["hit"] - hits_before
        console.print(f"tokenized splits: {hits} of {len(splits)} from cache ({cache.tokens_dir()})")
    return splits


def prepare_model(model: torch.nn.Module, recipe: Recipe, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Move the model to `device` and switch on the speed-ups; returns what was done, for the log.

    None of them changes the model's forward math: cheaper dropout masks, frozen weights stored in
    the autocast dtype (the same bits autocast would make at every step), the fused gated MLP and
    RMSNorm (whose backward works at bf16 precision), and the recipe's optional gradient
    checkpointing and torch.compile. Each patch of the model's code switches on only where its
    probe agrees with the model's own (`fast.probe`); where one declines, the notes say where and why.
    The task probes what its own fast paths need here too (`Task.prepare`: a causal LM's loss path).
    """
    notes = []

    def note(speed_up: SpeedUp) -> None:
        if speed_up.note():
            notes.append(speed_up.note())

    model.to(device)
    notes += get_task(recipe.model.task).prepare(model)  # in fp32, before frozen weights turn bf16 below
    if device.type == "cpu":
        note(use_fast_attention_dropout(model))
        if use_fast_dropout(model):
            notes.append("fast dropout")
        if not recipe.train.gradient_checkpointing:
            note(use_unpadded_encoder(model))
    if dtype != torch.float32 and store_frozen_weights(model, dtype):
        notes.append("frozen weights in bf16")
    note(use_fused_gated_mlp(model, dtype))
    if dtype != torch.float32:
        note(use_fused_rms_norm(model))
        note(use_shared_autocast_copy(model, dtype))
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        notes.append("gradient checkpointing")
    if recipe.train.compile:
        model.compile(dynamic=True)
        notes.append("torch.compile")
    return notes


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after the checkpoint it resumes from."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def train(recipe: Recipe, console: Console | None = None, overwrite: bool = False, dry_run: bool = False,
          resume: str | None = None, resume_command: str | None = None) -> dict:
    """Run a recipe end to end. Returns the final metrics ({split: {metric: value}}).

    `resume` is "latest" or a checkpoint directory: training continues exactly where that
    checkpoint left off; `overwrite` replaces the run instead, so passing both is an error.
    `resume_command` is shown when a signal interrupts the run.
    """
    if resume and overwrite:
        raise LorafitError("--resume continues a run and --overwrite replaces it; pass only one")
    bound_onednn_caches()
    console = console or Console()
    out = recipe.output_dir
    checkpoint = state = None
    if resume:
        checkpoint = find_checkpoint(out, resume)
        check_resumable(checkpoint, recipe.to_dict())
        state = load_training_state(checkpoint)
    elif not dry_run:
        prepare_output_dir(out, overwrite)
    s = setup(recipe, console, checkpoint)
    console.print(plan_table(s.plan, recipe))
    if dry_run:
        console.print(dump_recipe(recipe), markup=False, highlight=False)
        return {}
    if checkpoint is not None:
        truncate_metrics(out / "metrics.jsonl", state["progress"]["step"])
        console.print(f"[bold]resuming[/] from {checkpoint} (step {state['progress']['step']})")

    device = pick_device()
    dtype = resolve_precision(recipe.train.precision, device)
    splits = tokenize_splits(recipe, s, console)
    autocast = autocast_for(device, dtype)
    notes = prepare_model(s.model, recipe, device, dtype)
    release_free_memory()
    console.print(f"[bold]device[/] {device.type}, precision {precision_name(dtype)}"
                  f"{'; ' + ', '.join(notes) if notes else ''}; "
                  f"{len(splits['train'])} train / {len(splits['eval'])} eval examples")
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    metrics_log = MetricsLog(out / "metrics.jsonl")
    if "tensorboard" in recipe.train.loggers:
        metrics_log = with_tensorboard(metrics_log, out / "tensorboard")
    try:
        with stop_on_signals() as stop:
            final = fit(recipe, s, splits, device, autocast, out, metrics_log, console, state, stop, resume_command)
    finally:
        metrics_log.close()
    save_adapter(out / "adapter", s.model, s.plan, s.spec)
    write_json(out / "summary.json", final)
    plot_training(out)
    console.print(f"[bold green]done[/]: adapter in {out / 'adapter'}")
    return final


@contextmanager
def stop_on_signals():
    """While active, SIGINT/SIGTERM only set `stop["signal"]`; the loop checks it after each step."""
    stop: dict[str, int | None] = {"signal": None}

    def handler(signum, frame):
        stop["signal"] = signum

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- the loop's parts


def train_step(model: torch.nn.Module, task: Task, micro_batches: list[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scheduler, trainable: list[torch.nn.Parameter], max_norm: float,
               device: torch.device, autocast, label_smoothing: float = 0.0) -> tuple[float, float]:
    """One optimizer step over `micro_batches` (collated on the host): forward and backward of each,
    clip, step. Returns (the step's mean loss over its targets, the gradient norm before clipping).

    Each micro-batch's summed loss is divided by the targets of the whole step, so the gradients
    add up to those of the step's mean loss however it is cut. When the loss or the gradient norm
    is not finite the gradients are dropped and neither optimizer nor scheduler steps.
    """
    # Counted on the host, so that a GPU step waits on the device only once, below.
    n_targets = sum(task.count_targets(b) for b in micro_batches)
    loss_total = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            loss = task.loss(model, batch, label_smoothing) / n_targets
        loss.backward()
        loss_total += loss.detach().float()
    grad_norm_t = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    loss_sum, grad_norm = torch.stack([loss_total, grad_norm_t.float()]).tolist()
    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def new_progress() -> dict:
    """The loop's position and its running log window: all a checkpoint needs besides optimizer and RNGs."""
    return {"step": 0, "epoch": 0, "batch_index": 0, "elapsed_s": 0.0, "skipped_nonfinite": 0,
            "window": {"loss": 0.0, "batches": 0, "samples": 0, "tokens": 0}}


def add_to_window(window: dict, loss: float, micro_batches: list[dict[str, torch.Tensor]]) -> None:
    """Count a step's loss, samples and real tokens (padding left out) into the log window."""
    window["loss"] += loss
    window["batches"] += 1
    window["samples"] += sum(len(b["input_ids"]) for b in micro_batches)
    window["tokens"] += sum(int(b.get("token_mask", b["attention_mask"]).sum()) for b in micro_batches)


def log_window(metrics_log, progress: dict, epoch: float, lr: float, grad_norm: float, seconds: float,
               elapsed: float) -> dict:
    """Write the training record of the steps since the last one (`seconds` long) and empty the window.

    The record: step, epoch (fractional), mean loss over the window's steps, learning rate, the
    last step's gradient norm, samples/s and tokens/s over the window, seconds since training
    started, and the skipped non-finite steps, if any.
    """
    window = progress["window"]
    record = {
        "step": progress["step"],
        "epoch": round(epoch, 4),
        "loss": window["loss"] / window["batches"],
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_s": window["samples"] / seconds,
        "tokens_per_s": window["tokens"] / seconds,
        "elapsed_s": elapsed,
    }
    if progress["skipped_nonfinite"]:
        record["skipped_nonfinite"] = progress["skipped_nonfinite"]
    metrics_log.write(record)
    window.update(loss=0.0, batches=0, samples=0, tokens=0)
    return record


def evaluate_split(task: Task, model: torch.nn.Module, split: Split, name: str, step: int, batch_size: int,
                   pad_id: int, device: torch.device, autocast, metrics_log, console: Console) -> dict:
    """The task's metrics on `split`, written to the log as {"step", "split": name, ...} and shown."""
    metrics = task.evaluate(model, split, batch_size, pad_id, device, autocast)
    metrics_log.write({"step": step, "split": name, **metrics})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    console.print(f"step {step} [bold]{name}[/]: {shown}")
    return metrics


def write_checkpoint(out: Path, s: Setup, optimizer: torch.optim.Optimizer, scheduler, progress: dict,
                     keep: int | None) -> Path:
    """checkpoints/step-N for the current step; only the newest `keep` are kept (None: all)."""
    path = save_checkpoint(out / "checkpoints" / f"step-{progress['step']}", s.model, s.plan, s.spec, optimizer,
                           scheduler, progress)
    if keep:
        prune_checkpoints(out, keep)
    return path


def nonfinite_error(loss: float, step: int, last_checkpoint: Path | None) -> LorafitError:
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
    return LorafitError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step}; stopping "
                        f"({kept}). Lower optim.lr, or set train.skip_nonfinite: true to skip such batches")


def fit(recipe: Recipe, s: Setup, splits: dict[str, Split], device: torch.device, autocast, out: Path,
        metrics_log: MetricsLog, console: Console, state: dict | None = None, stop: dict | None = None,
        resume_command: str | None = None) -> dict:
    """The training loop. `state` (from a checkpoint) restores optimizer, scheduler, position and RNGs."""
    cfg, task = recipe.train, get_task(recipe.model.task)
    train_split = splits["train"]
    pad_id = s.tokenizer.pad_token_id
    eval_batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(len(train_split), cfg.batch_size, cfg.grad_accum_steps)
    warmup_steps = round(recipe.optim.warmup_ratio * total_steps)
    optimizer = build_optimizer(s.model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup_steps=warmup_steps, total_steps=total_steps,
                                     kind=recipe.optim.scheduler))
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    max_norm = recipe.optim.max_grad_norm or float("inf")
    stop = stop if stop is not None else {"signal": None}
    collate_batch = functools.partial(task.collate, multiple=pad_multiple(cfg, device), cap=recipe.data.max_length)
    progress = new_progress()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = state["progress"]
    last_checkpoint: Path | None = None

    def run_eval(name: str, step: int) -> dict:
        return evaluate_split(task, s.model, splits[name], name, step, eval_batch_size, pad_id, device, autocast,
                              metrics_log, console)

    def checkpoint() -> Path:
        progress["elapsed_s"] = time.perf_counter() - start
        return write_checkpoint(out, s, optimizer, scheduler, progress, cfg.keep_checkpoints)

    progress_bar = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    bar = progress_bar.add_task("train", total=total_steps, completed=progress["step"], loss="-", rate="-")
    s.model.train()
    if state is not None:
        set_rng_state(state["rng"])  # last, so nothing above consumes random numbers after it
    start = time.perf_counter() - progress["elapsed_s"]
    window_start = time.perf_counter()
    if cfg.eval_at_start and state is None:
        for name in ("eval", "test"):
            if name in splits:
                run_eval(name, 0)
        start = window_start = time.perf_counter()  # training time starts after the baseline
    with progress_bar:
        while progress["step"] < total_steps:
            epoch = progress["epoch"]
            steps_at_epoch_start, resumed_mid_epoch = progress["step"], progress["batch_index"] > 0
            batches = batch_order(train_split.lengths, cfg.batch_size, recipe.seed, epoch, cfg.group_by_length)
            for first in range(progress["batch_index"], len(batches), cfg.grad_accum_steps):
                micro = batches[first:first + cfg.grad_accum_steps]
                progress["batch_index"] = first + len(micro)
                host = [collate_batch(train_split, b, pad_id) for b in micro]
                loss, grad_norm = train_step(s.model, task, host, optimizer, scheduler, trainable, max_norm, device,
                                             autocast, cfg.label_smoothing)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    if not cfg.skip_nonfinite:
                        raise nonfinite_error(loss, progress["step"] + 1, last_checkpoint)
                    progress["skipped_nonfinite"] += 1
                    continue
                progress["step"] += 1
                step = progress["step"]
                add_to_window(progress["window"], loss, host)
                progress_bar.update(bar, advance=1, loss=f"{loss:.4f}")
                apply_rank_schedule(s.model, recipe.lora.rank_schedule, step, total_steps, optimizer, trainable,
                                    console)
                if step % cfg.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    record = log_window(metrics_log, progress, epoch + progress["batch_index"] / len(batches),
                                        scheduler.get_last_lr()[0], grad_norm, max(now - window_start, 1e-9),
                                        now - start)
                    progress_bar.update(bar, rate=f"{record['samples_per_s']:.1f}")
                    window_start = now
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    for name in dict.fromkeys(cfg.eval_splits):
                        if name in splits:
                            run_eval(name, step)
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if cfg.save_every and step % cfg.save_every == 0:
                    last_checkpoint = checkpoint()
                if stop["signal"] is not None:
                    path = checkpoint()
                    hint = resume_command or f"lorafit train <recipe> --resume {path}"
                    raise TrainingInterrupted(f"interrupted by signal {stop['signal']} after step {step}; "
                                              f"checkpoint saved to {path}; continue with: {hint}", stop["signal"])
                if step >= total_steps:
                    break
            else:
                if progress["step"] == steps_at_epoch_start and not resumed_mid_epoch:
                    raise LorafitError(f"every batch of epoch {epoch} had a non-finite loss or gradient; "
                                       f"check the data and the model, or lower optim.lr")
                progress["epoch"] += 1
                progress["batch_index"] = 0

    step = progress["step"]
    final = {"train_time_s": time.perf_counter() - start, "steps": step,
             "skipped_nonfinite": progress["skipped_nonfinite"]}
    final["eval"] = run_eval("eval", step)
    if "test" in splits:
        final["test"] = run_eval("test", step)
    return final
