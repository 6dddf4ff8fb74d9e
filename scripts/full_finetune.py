"""Fine-tune a recipe's model in full, extract LoRA adapters from it, and score them all.

Every weight of the model trains (no LoRA) on the recipe's data with its batches, precision,
schedule and label smoothing, for a fixed number of steps; only the learning rate is the
script's (full fine-tuning wants a smaller one). The model is saved to OUTPUT/model, LoRA
adapters are extracted from it at each rank (`lorafit extract`), and the full model and every
adapter are scored on the test split (`lorafit eval`). Runs of LoRA trained directly at a rank
(`--lora-run RANK=RUN_DIR`, their summary.json) go beside them in the markdown table.

    SCIKIT_LEARN_DATA=../shared/data/scikit_learn_data python scripts/full_finetune.py configs/newsgroups.yaml \\
        --output runs/newsgroups-full --lr 1e-4 --lora-run 16=runs/newsgroups

`--set KEY=VALUE` overrides recipe keys as `lorafit train` does; `--skip-training` reuses OUTPUT/model.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from lorafit.data import batch_order, steps_per_epoch
from lorafit.extract import extract_adapter
from lorafit.inference import run_eval
from lorafit.io import write_json
from lorafit.lowrank import RankRule
from lorafit.models import load_model, load_tokenizer, resolve_model
from lorafit.recipe import Recipe, dump_recipe, load_recipe
from lorafit.tasks.classification import collate, load_classification_data, tokenize
from lorafit.device import autocast_for, pick_device, resolve_precision
from lorafit.train import build_optimizer, lr_lambda, pad_multiple, prepare_model, seed_everything


def train_full(recipe: Recipe, directory: Path, steps: int | None, lr: float) -> int:
    """Train every weight of the recipe's model; save it (with lorafit.json) to `directory`. Returns the steps run."""
    if recipe.model.task != "sequence-classification" or recipe.train.grad_accum_steps != 1:
        raise SystemExit("full_finetune.py handles sequence classification with train.grad_accum_steps: 1")
    seed_everything(recipe.seed)
    source = resolve_model(recipe.model.name)
    data = load_classification_data(recipe.data, recipe.seed)
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, recipe.model.task, tokenizer, data.labels, dropout=recipe.model.dropout,
                       attention_dropout=recipe.model.attention_dropout)
    train = tokenize(data.train, tokenizer, recipe.data.max_length, cache=recipe.data.cache)
    device = pick_device()
    dtype = resolve_precision(recipe.train.precision, device)
    autocast = autocast_for(device, dtype)
    print(f"device {device.type}, {'bf16' if dtype == torch.bfloat16 else 'fp32'}; speed-ups: "
          f"{prepare_model(model, recipe, device, dtype)}", flush=True)
    cfg = recipe.train
    total = steps or cfg.max_steps or cfg.epochs * steps_per_epoch(len(train), cfg.batch_size, 1)
    recipe.optim.lr = lr
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_lambda, warmup_steps=round(recipe.optim.warmup_ratio * total), total_steps=total,
        kind=recipe.optim.scheduler))
    params = [p for p in model.parameters() if p.requires_grad]
    step, epoch, start = 0, 0, time.perf_counter()
    model.train()
    while step < total:
        for indices in batch_order(train.lengths, cfg.batch_size, recipe.seed, epoch, cfg.group_by_length):
            batch = collate(train, indices, tokenizer.pad_token_id, multiple=pad_multiple(cfg, device),
                            cap=recipe.data.max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=cfg.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.optim.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == total:
                print(f"step {step}/{total} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if step >= total:
                break
        epoch += 1
    # Saved as `lorafit merge` saves a model: plain attention (not lorafit's training kernel), the
    # label names in the config, and lorafit.json with the recipe, so `lorafit eval` scores it.
    model.set_attn_implementation("sdpa")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_json(directory / "lorafit.json", {"task": recipe.model.task, "labels": data.labels,
                                            "max_length": recipe.data.max_length, "recipe": recipe.to_dict()})
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a recipe key")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the full fine-tune")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--lora-run", action="append", default=[], metavar="RANK=RUN_DIR",
                        help="a lorafit run of LoRA at that rank, for comparison (repeatable)")
    parser.add_argument("--save-module", action="append", default=[], metavar="NAME",
                        help="also save this module in full in every extracted adapter (repeatable)")
    parser.add_argument("--skip-training", action="store_true", help="reuse OUTPUT/model")
    parser.add_argument("--max-samples", type=int, help="score only the first N test examples (smoke runs)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    args.output.mkdir(parents=True, exist_ok=True)
    recipe_file = args.output / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    model_dir = args.output / "model"
    if not args.skip_training:
        steps = train_full(recipe, model_dir, args.steps, args.lr)
        print(f"full fine-tune: {steps} steps at lr {args.lr:g}; model in {model_dir}", flush=True)

    quiet = Console(quiet=True)
    score = lambda path: run_eval(path, recipe_path=recipe_file, max_samples=args.max_samples,  # noqa: E731
                                  output=args.output / f"{Path(path).name}-test.json", console=quiet).report
    full = score(model_dir)
    lora_runs = dict(item.split("=", 1) for item in args.lora_run)
    rows = []
    for rank in args.ranks:
        adapter = args.output / f"extract-r{rank}"
        result = extract_adapter(recipe.model.name, str(model_dir), adapter, RankRule(rank=rank),
                                 save_modules=args.save_module, overwrite=True)
        report = score(adapter)
        direct = (json.loads((Path(lora_runs[str(rank)]) / "summary.json").read_text())["test"]["accuracy"]
                  if str(rank) in lora_runs else None)
        rows.append({"rank": rank, "energy_kept": result.energy_kept, "accuracy": report["accuracy"],
                     "lora_accuracy": direct})
        print(f"rank {rank}: energy kept {result.energy_kept:.4f}, accuracy {report['accuracy']:.4f}", flush=True)
    lines = ["| rank | energy of W_tuned − W_base kept | extracted adapter: test accuracy | "
             "LoRA trained at this rank: test accuracy |", "|---|---|---|---|"]
    for r in rows:
        direct = f"{r['lora_accuracy']:.4f}" if r["lora_accuracy"] is not None else "not measured"
        lines.append(f"| {r['rank']} | {100 * r['energy_kept']:.1f}% | {r['accuracy']:.4f} | {direct} |")
    lines.append(f"| full fine-tune | 100% | {full['accuracy']:.4f} | |")
    if result.unsaved_changes:
        name, change = max(result.unsaved_changes.items(), key=lambda item: item[1])
        lines.append(f"\nThe adapters leave out {len(result.unsaved_changes)} other tensors the fine-tune changed "
                     f"(largest change {change:.3g}, in {name}); --save-module NAME keeps a module.")
    table = "\n".join(lines)
    (args.output / "table.md").write_text(table + "\n")
    write_json(args.output / "results.json", {"full": full["accuracy"], "ranks": rows, "examples": full["examples"]})
    print(f"\n{table}\n\n({full['examples']} test examples; files in {args.output})")


if __name__ == "__main__":
    main()
