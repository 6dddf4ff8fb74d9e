"""Test accuracy along several runs, side by side, with each final adapter's ranks: a markdown table.

For the low-rank comparisons (PiSSA against default init; a shrinking rank against a fixed one),
trained with a test curve (`--set "train.eval_splits=[eval,test]"`):

    python scripts/compare_runs.py runs/newsgroups-default runs/newsgroups-pissa
    python scripts/compare_runs.py runs/newsgroups-r4 runs/newsgroups-shrink
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit.adapter import find_adapter, lora_factors, read_adapter_spec, read_adapter_weights
from lorafit.recipe import load_recipe
from lorafit.report import read_metrics_log


def test_curve(run: Path) -> dict[int, float]:
    """{step: test accuracy}; a step logged twice (a resumed run) keeps its last record."""
    return {r["step"]: r["accuracy"] for r in read_metrics_log(run) if r.get("split") == "test" and "accuracy" in r}


def describe(run: Path) -> str:
    """The run's rank, init and lr settings, as its recipe gives them."""
    recipe = load_recipe(run / "recipe.yaml")
    lora = recipe.lora
    schedule = ", ".join(f"{step}: {rank:g}" for step, rank in sorted(lora.rank_schedule.items()))
    return (f"rank {lora.rank}, init {lora.init}, lr {recipe.optim.lr:g}"
            + (f", schedule {{{schedule}}}" if schedule else ""))


def final_ranks(run: Path) -> str:
    adapter = find_adapter(run)
    ranks = [f.rank for f in lora_factors(read_adapter_spec(adapter), read_adapter_weights(adapter)).values()]
    return f"{sum(ranks)} ({min(ranks)}-{max(ranks)} over {len(ranks)} modules)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    curves = {run: test_curve(run) for run in args.runs}
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = ["| run | settings | saved adapter's total rank | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for run, curve in curves.items():
        cells = [f"{curve[s]:.4f}" if s in curve else "" for s in steps]
        lines.append(f"| {run.name} | {describe(run)} | {final_ranks(run)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
