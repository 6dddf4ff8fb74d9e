"""The `lorafit` command line: thin Typer commands over the library functions.

User errors (`LorafitError`) are handled here, once: a one-line message on stderr and exit code
2 (128 + the signal for an interrupted run), with no traceback unless LORAFIT_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lorafit.errors import LorafitError

app = typer.Typer(help="LoRA fine-tuning of Hugging Face transformers, driven by YAML recipes.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line


def _quiet_libraries() -> None:
    """Keep transformers' and datasets' chatter (weight-init notes, progress bars) off the console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", module="transformers")
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def user_errors(command):
    """Turn `LorafitError` into a one-line message and its exit code (2 for bad input)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LorafitError as err:
            if os.environ.get("LORAFIT_DEBUG") == "1":
                raise
            message = str(err)
            Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True,
                                                        soft_wrap=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: --set lora.rank=4 (YAML value).")]


@app.command()
@user_errors
def train(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Overrides train.output_dir.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and LoRA plan, then stop.")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", metavar="[CHECKPOINT]",
        help="Continue from the latest complete checkpoint in the output directory (no value), or from CHECKPOINT.")] = None,
    nproc: Annotated[int | None, typer.Option(
        "--nproc", help="Train on N processes of this machine, one per GPU (or sharing the CPU cores): "
                        "starts torchrun's launcher.")] = None,
) -> None:
    """Fine-tune a model with LoRA as a recipe says; write the adapter, checkpoints and metrics."""
    from lorafit.recipe import load_recipe
    from lorafit.train import train as run_training

    overrides = list(overrides or [])
    if nproc is not None:
        from lorafit.device import pick_device
        from lorafit.distributed import launch

        args = ["train", str(recipe_path), *[arg for o in overrides for arg in ("--set", o)]]
        args += ["--output-dir", str(output_dir)] if output_dir is not None else []
        args += ["--overwrite"] * overwrite + ["--dry-run"] * dry_run + (["--resume", resume] if resume else [])
        launch(nproc, args, pick_device().type)
    if output_dir is not None:
        overrides.append(f"train.output_dir={output_dir}")
    recipe = load_recipe(recipe_path, overrides)
    resume_command = shlex.join(["lorafit", "train", str(recipe_path),
                                 *[arg for o in overrides for arg in ("--set", o)], "--resume"])
    _quiet_libraries()
    run_training(recipe, console=console, overwrite=overwrite, dry_run=dry_run, resume=resume,
                 resume_command=resume_command)


@app.command()
@user_errors
def validate(recipe_path: RecipeArg, overrides: SetOpt = None) -> None:
    """Check a recipe (keys, types, values) without loading anything."""
    from lorafit.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides or []))
    console.print(f"[green]ok[/]: {recipe_path} is a valid recipe (run '{recipe.name}', output in {recipe.output_dir})")


DtypeOpt = Annotated[str, typer.Option("--dtype", help="Dtype of the saved weights: float32, bfloat16 or float16.")]
BaseOpt = Annotated[str | None, typer.Option("--base", help="Base model to use instead of the adapter's base_model_name_or_path.")]
ModelArg = Annotated[Path, typer.Argument(help="A run directory, an adapter directory or a merged model directory.",
                                          show_default=False)]


@app.command()
@user_errors
def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory (lorafit's or PEFT's), or a run directory.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the merged model to.",
                                         show_default=False)],
    dtype: DtypeOpt = "float32",
    base: BaseOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing model directory.")] = False,
) -> None:
    """Fold an adapter into its base model's weights and save a plain Hugging Face model."""
    from lorafit.merge import merge_adapter

    _quiet_libraries()
    result = merge_adapter(adapter_dir, output, dtype=dtype, base=base, overwrite=overwrite)
    console.print(f"merged {result.merged_layers} LoRA layers; largest logit difference on the probe batch "
                  f"{result.max_logit_diff:.3g} ({result.dtype}, tolerance {result.tolerance:.3g})")
    console.print(f"[bold green]done[/]: model in {result.output}")


NumBeamsOpt = Annotated[int, typer.Option("--num-beams", help="Seq2seq: search this many beams (1: greedy).")]


@app.command("eval")
@user_errors
def eval_(
    path: ModelArg,
    recipe_path: Annotated[Path | None, typer.Option("--recipe", help="Recipe whose data section to use.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split to score (default: the recipe's test split).")] = None,
    data_files: Annotated[str | None, typer.Option("--data-files", help="A labelled .jsonl/.json/.csv/.parquet file to score instead.")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Score only the first N examples.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON report path (the confusion PNG goes beside it).")] = None,
    base: BaseOpt = None,
    num_beams: NumBeamsOpt = 1,
) -> None:
    """Score a run, an adapter or a merged model on a split.

    Classifiers: accuracy, F1, confusion matrix. Causal LMs: loss, perplexity and, for prompt +
    completion data, exact match of greedy completions. Seq2seq: loss, perplexity, BLEU and chrF
    of its translations (greedy, or beam search with --num-beams), listed beside their references.
    """
    from lorafit.inference import run_eval

    _quiet_libraries()
    run_eval(path, recipe_path=recipe_path, split=split, data_files=data_files, max_samples=max_samples,
             base=base, output=output, console=console, num_beams=num_beams)


@app.command("predict")
@user_errors
def predict_(
    path: ModelArg,
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", help="More texts: .jsonl (a 'text' field per line) or .txt (a text per line).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write predictions as JSON lines here.")] = None,
    base: BaseOpt = None,
) -> None:
    """Label texts with a labelling model: for a classifier, the top label and the probability of every label."""
    from lorafit.inference import run_predict

    _quiet_libraries()
    run_predict(path, list(texts or []), file=file, output=output, base=base, console=console)


@app.command()
@user_errors
def generate(
    path: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt to continue.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generate at most this many tokens.")] = 128,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", help="Sampling temperature; 0 means greedy. Default: 0.7 for causal LMs, 0 for seq2seq.",
        show_default=False)] = None,
    top_p: Annotated[float, typer.Option("--top-p", help="Sample from the top-p probability mass.")] = 0.9,
    chat_template: Annotated[bool | None, typer.Option(
        "--chat-template/--no-chat-template",
        help="Render the prompt as a chat turn (default: as in training, data.use_chat_template).")] = None,
    base: BaseOpt = None,
    num_beams: NumBeamsOpt = 1,
) -> None:
    """Generate text from a generating model (a run, an adapter or a merged model), streaming it as it comes.

    Causal LMs continue the prompt; seq2seq models translate it (the recipe's data.source_prefix first)."""
    from lorafit.inference import run_generate

    _quiet_libraries()
    run_generate(path, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, base=base,
                 num_beams=num_beams, use_chat_template=chat_template,
                 on_text=lambda text: typer.echo(text, nl=False))
    typer.echo()


@app.command()
@user_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holds metrics.jsonl).", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG path (default: RUN_DIR/plot.png).")] = None,
) -> None:
    """Plot training loss, learning rate and eval metrics against step from a run's metrics.jsonl."""
    from lorafit.report import plot_training

    console.print(f"plot in {plot_training(run_dir, output)}")


AdapterArg = Annotated[Path, typer.Argument(help="An adapter directory (lorafit's or PEFT's) or a run directory.",
                                            show_default=False)]
RankOpt = Annotated[int | None, typer.Option("--rank", help="The same rank for every module (modules already at or "
                                                            "below it are kept as they are).", show_default=False)]
EnergyOpt = Annotated[float | None, typer.Option("--energy", help="Per module, the smallest rank that keeps this "
                                                                  "share of ‖ΔW‖_F², e.g. 0.9.", show_default=False)]


@app.command()
@user_errors
def inspect(
    adapter: AdapterArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON, singular values included.")] = False,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Also draw the spectra as a PNG here.")] = None,
) -> None:
    """Per module: rank, ‖ΔW‖_F, singular values, effective rank, ranks for 90%/99% of the energy, stable rank."""
    from lorafit.adapter import find_adapter
    from lorafit.spectrum import adapter_spectra, plot_spectra, spectra_json, spectra_table

    spectra = adapter_spectra(adapter)
    if as_json:
        typer.echo(json.dumps(spectra_json(spectra, find_adapter(adapter)), indent=2))
    else:
        console.print(spectra_table(spectra, title=str(find_adapter(adapter))))
    if plot_path is not None:
        path = plot_spectra(spectra, plot_path, title=str(find_adapter(adapter)))
        (Console(stderr=True) if as_json else console).print(f"spectra in {path}")


def _sizes(before: int, after: int) -> str:
    return f"{before:,} -> {after:,} ({100 * after / before:.1f}%)" if before else f"{before:,} -> {after:,}"


@app.command()
@user_errors
def resize(
    adapter: AdapterArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the resized adapter to.",
                                         show_default=False)],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Keep the singular values of at least "
                                                                "σ_max / RATIO, e.g. 10.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing adapter directory.")] = False,
) -> None:
    """Cut an adapter's ranks by truncated SVD (the optimal truncation); no base model needed."""
    from lorafit.lowrank import RankRule
    from lorafit.resize import ranks_table, resize_adapter

    result = resize_adapter(adapter, output, RankRule(rank=rank, energy=energy, ratio=ratio), overwrite=overwrite)
    if result.above_rank:
        console.print(f"--rank {rank} is above the rank of {len(result.above_rank)} modules (e.g. "
                      f"{result.above_rank[0]}); they are kept as they are")
    console.print(ranks_table(f"resized to {result.rule}", result.modules, result.energy_kept))
    console.print(f"LoRA parameters {_sizes(result.lora_params_before, result.lora_params_after)}; "
                  f"adapter file bytes {_sizes(result.bytes_before, result.bytes_after)}")
    console.print(f"[bold green]done[/]: {100 * result.energy_kept:.2f}% of the update's energy kept; "
                  f"adapter in {result.output}")


@app.command()
@user_errors
def extract(
    base: Annotated[str, typer.Option("--base", help="The base model (directory or hub id).", show_default=False)],
    tuned: Annotated[str, typer.Option("--tuned", help="The fully fine-tuned model (directory or hub id).",
                                       show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the adapter to.",
                                         show_default=False)],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    save_modules: Annotated[list[str] | None, typer.Option(
        "--save-module", help="Also save this module in full (repeatable); a classifier's head always is.")] = None,
    target_modules: Annotated[list[str] | None, typer.Option(
        "--target-modules", help="Layers to adapt (repeatable; default: all-linear).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing adapter directory.")] = False,
) -> None:
    """Build a LoRA adapter from a fully fine-tuned model: the truncated SVD of W_tuned − W_base per linear layer."""
    from lorafit.extract import extract_adapter
    from lorafit.lowrank import RankRule
    from lorafit.resize import ranks_table

    _quiet_libraries()
    targets = target_modules if target_modules and target_modules != ["all-linear"] else "all-linear"
    result = extract_adapter(base, tuned, output, RankRule(rank=rank, energy=energy), save_modules=save_modules or [],
                             target_modules=targets, overwrite=overwrite)
    console.print(ranks_table(f"extracted at {result.rule}", result.modules, result.energy_kept, before="full rank"))
    console.print(f"saved in full: {', '.join(result.saved_modules) or '-'}")
    if result.unsaved_changes:
        name, change = max(result.unsaved_changes.items(), key=lambda item: item[1])
        console.print(f"[yellow]not in the adapter[/]: {len(result.unsaved_changes)} other tensors changed (the "
                      f"largest change is {change:.3g} in {name}); add --save-module NAME to keep a module in full")
    console.print(f"[bold green]done[/]: {100 * result.energy_kept:.2f}% of the difference's energy kept; "
                  f"adapter in {result.output}")


def normalize_args(args: list[str]) -> list[str]:
    """Let `--resume` stand alone: Typer options need a value, so a bare `--resume` means `--resume latest`."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("latest")
    return out


def main() -> None:
    from lorafit.onednn import bound_onednn_caches

    bound_onednn_caches()  # before any command's first matmul
    app(args=normalize_args(sys.argv[1:]), prog_name="lorafit")


if __name__ == "__main__":
    sys.exit(main())
