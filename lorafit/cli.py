"""The `lorafit` command line: thin Typer commands over the library functions.

User errors (`LorafitError`) are handled here, once: a one-line message on stderr and exit code
2, with no traceback unless LORAFIT_DEBUG=1.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lorafit.errors import LorafitError

app = typer.Typer(help="LoRA fine-tuning of Hugging Face transformers, driven by YAML recipes.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(highlight=False)

EXIT_USER_ERROR = 2


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
    """Turn `LorafitError` into a one-line message and exit code 2."""

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
            raise typer.Exit(EXIT_USER_ERROR) from None

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
) -> None:
    """Fine-tune a model with LoRA as a recipe says; write the adapter, checkpoints and metrics."""
    from lorafit.recipe import load_recipe
    from lorafit.train import train as run_training

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"train.output_dir={output_dir}")
    recipe = load_recipe(recipe_path, overrides)
    _quiet_libraries()
    run_training(recipe, console=console, overwrite=overwrite, dry_run=dry_run)


@app.command()
@user_errors
def validate(recipe_path: RecipeArg, overrides: SetOpt = None) -> None:
    """Check a recipe (keys, types, values) without loading anything."""
    from lorafit.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides or []))
    console.print(f"[green]ok[/]: {recipe_path} is a valid recipe (run '{recipe.name}', output in {recipe.output_dir})")


def main() -> None:
    app(prog_name="lorafit")


if __name__ == "__main__":
    sys.exit(main())
