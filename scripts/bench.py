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

    python scripts/bench.py --task newsgroups --steps 40 --rounds 3
    python scripts/bench.py --task newsgroups --steps 40 --rounds 3 --same-settings
    python scripts/bench.py --task smollm2 --steps 12 --rounds 2
    python scripts/bench.py --time-to-accuracy            # newsgroups recipe, test accuracy >= 0.70
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    # recipe, LoRA targets, batch size, max_length
    "newsgroups": ("configs/newsgroups.yaml", ["query", "value"], 16, 256),
    "smollm2": ("configs/smollm2-newsgroups-lm.yaml", ["q_proj", "v_proj"], 8, 256),
}
LORA_RANK, LORA_ALPHA = 8, 16  # the throughput jobs' LoRA, on both sides whatever the recipe says


# ---------------------------------------------------------------- workers (one per process)


def texts_and_labels(task: str, n: int, seed: int):
    from lorafit.recipe import load_recipe
    from lorafit.tasks.causal_lm import load_lm_data
    from lorafit.tasks.classification import load_classification_data

    recipe = load_recipe(ROOT / TASKS[task][0])
    recipe.data.max_train_samples = n
    if task == "newsgroups":
        data = load_classification_data(recipe.data, seed)
        return data.train.texts, data.train.labels, len(data.labels)
    data = load_lm_data(recipe.data, seed)
    return [e["text"] for e in data.train], None, None


def base_model_name(task: str, model: str | None) -> str:
    return model or yaml.safe_load((ROOT / TASKS[task][0]).read_text())["model"]["name"]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker_peft(task: str, steps: int, warmup: int, tuned: bool, model_name: str | None) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, TaskType, get_peft_model

    from lorafit.data import batch_order
    from lorafit.models import load_model, load_tokenizer, resolve_model
    from lorafit.device import pick_device

    recipe_path, targets, batch_size, max_length = TASKS[task]
    torch.manual_seed(0)
    device = pick_device()
    texts, labels, n_labels = texts_and_labels(task, steps * batch_size, seed=42)
    source = resolve_model(base_model_name(task, model_name))
    tokenizer = load_tokenizer(source)
    classify = task == "newsgroups"
    model, _ = load_model(source, "sequence-classification" if classify else "causal-lm", tokenizer,
                          [str(i) for i in range(n_labels)] if classify else None)
    config = LoraConfig(task_type=TaskType.SEQ_CLS if classify else TaskType.CAUSAL_LM, r=LORA_RANK,
                        lora_alpha=LORA_ALPHA, lora_dropout=0.1 if classify else 0.0, target_modules=targets)
    model = get_peft_model(model, config).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    if not classify:
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    order = batch_order([len(x) for x in ids], batch_size, 42, 0, group_by_length=tuned)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if tuned else torch.enable_grad
    tokens = samples = 0
    start = None
    for step, batch_ids in enumerate(order[:steps]):
        if step == warmup:
            synchronize(device)
            start, tokens, samples = time.perf_counter(), 0, 0
        enc = tokenizer.pad({"input_ids": [ids[i] for i in batch_ids]}, return_tensors="pt")
        tokens += int(enc["attention_mask"].sum())
        enc = {k: v.to(device) for k, v in enc.items()}
        with autocast():
            if classify:
                logits = model(**enc).logits
                loss = F.cross_entropy(logits.float(), torch.tensor([labels[i] for i in batch_ids], device=device))
            else:
                target = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                loss = model(**enc, labels=target).loss
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


def worker_lorafit(task: str, steps: int, warmup: int, same_settings: bool, model_name: str | None) -> dict:
    import io

    from rich.console import Console

    from lorafit.recipe import load_recipe
    from lorafit.device import pick_device
    from lorafit.train import train

    recipe_path, targets, batch_size, max_length = TASKS[task]
    overrides = [f"train.max_steps={steps}", f"data.max_train_samples={steps * batch_size}",
                 f"train.batch_size={batch_size}", f"lora.target_modules=[{','.join(targets)}]",
                 f"data.max_length={max_length}", f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}",
                 "data.max_eval_samples=8", "data.test_split=null", "train.eval_every=null",
                 "train.save_every=null", "train.eval_at_start=false", "train.log_every=1"]
    if same_settings:
        overrides += ["train.precision=fp32", "train.group_by_length=false", "model.dropout=null",
                      "model.attention_dropout=null"]
    if model_name:
        overrides.append(f"model.name={model_name}")
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(ROOT / recipe_path, [*overrides, f"train.output_dir={tmp}/run"])
        train(recipe, console=Console(file=log, width=200))
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if "split" not in m and m["step"] > warmup]
    # Each line covers one step (log_every=1): its time is samples / (samples/s).
    seconds = sum(batch_size / m["samples_per_s"] for m in steady)
    tokens = sum(m["tokens_per_s"] * batch_size / m["samples_per_s"] for m in steady)
    # The run's own "device ..., precision ..." line: what lorafit picked with no recipe change.
    picked = next((line.strip() for line in log.getvalue().splitlines() if line.startswith("device ")), "")
    return {"tokens_per_s": tokens / seconds, "samples_per_s": batch_size * len(steady) / seconds,
            "picked": picked, **device_info(pick_device())}


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
    """Training matmul FLOPs per (padded) token with frozen base weights: forward 2·P, input
    gradients 2·P (no weight gradients for frozen layers). Attention-score matmuls are left out,
    so the fraction is a lower bound."""
    from lorafit.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(base_model_name(task, model_name))
    model, _ = load_model(source, "sequence-classification" if task == "newsgroups" else "causal-lm",
                          load_tokenizer(source), ["a", "b"] if task == "newsgroups" else None)
    import torch

    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 4.0 * params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="newsgroups")
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
    parser.add_argument("--model", help="base model (hub name or local directory) instead of the recipe's, for "
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
