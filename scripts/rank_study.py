"""How much rank a trained adapter needs: resize it (`lorafit resize`) to several ranks and energy
shares, score every version on the run's test split (`lorafit eval`), and print a markdown table
of test accuracy against adapter size.

    SCIKIT_LEARN_DATA=../shared/data/scikit_learn_data python scripts/rank_study.py runs/newsgroups

writes the resized adapters and their eval reports to RUN/rank-study/ (or --output) and prints
the table (also saved there as table.md and results.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from lorafit.adapter import WEIGHTS_FILE, find_adapter, lora_factors, read_adapter_spec, read_adapter_weights
from lorafit.inference import run_eval
from lorafit.lowrank import RankRule
from lorafit.resize import resize_adapter

VARIANTS = {"rank 8": RankRule(rank=8), "rank 4": RankRule(rank=4), "rank 2": RankRule(rank=2),
            "rank 1": RankRule(rank=1), "energy 0.9": RankRule(energy=0.9), "energy 0.99": RankRule(energy=0.99)}


def adapter_ranks(adapter: Path) -> list[int]:
    modules = lora_factors(read_adapter_spec(adapter), read_adapter_weights(adapter))
    return [factors.rank for factors in modules.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (its adapter/ and recipe.yaml)")
    parser.add_argument("--output", type=Path, help="where the resized adapters go (default RUN/rank-study)")
    parser.add_argument("--max-samples", type=int, help="score only the first N test examples (smoke runs)")
    args = parser.parse_args()
    out = args.output or args.run / "rank-study"
    out.mkdir(parents=True, exist_ok=True)
    quiet = Console(quiet=True)
    source = find_adapter(args.run)
    rows = []
    for label, rule in {"trained": None, **VARIANTS}.items():
        adapter, energy = source, 1.0
        if rule is not None:
            adapter = out / label.replace(" ", "-")
            energy = resize_adapter(source, adapter, rule, overwrite=True).energy_kept
        report = run_eval(adapter, recipe_path=args.run / "recipe.yaml", max_samples=args.max_samples,
                          output=out / f"{adapter.name}-test.json", console=quiet).report
        ranks = adapter_ranks(adapter)
        rows.append({"adapter": label, "total_rank": sum(ranks), "ranks": f"{min(ranks)}-{max(ranks)}",
                     "bytes": (adapter / WEIGHTS_FILE).stat().st_size, "energy_kept": energy,
                     "accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "examples": report["examples"]})
        print(f"{label}: accuracy {report['accuracy']:.4f}", flush=True)
    lines = ["| adapter | total rank (per module) | adapter file | energy kept | test accuracy | macro-F1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['adapter']} | {r['total_rank']} ({r['ranks']}) | {r['bytes'] / 1e3:,.0f} kB | "
                     f"{100 * r['energy_kept']:.1f}% | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{table}\n\n({rows[0]['examples']} test examples; files in {out})")


if __name__ == "__main__":
    main()
