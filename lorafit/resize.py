"""`lorafit resize`: truncate an adapter's ranks, optimally, without a base model.

Each module's ΔW = s·B·A is cut to the rank the rule chooses (`lowrank.RankRule`: one rank for
all, an energy share per module, or a singular-value ratio) by its truncated SVD, the best
approximation at that rank (Eckart-Young), with √σ on both new factors. The module's scaling is
kept and its alpha follows the new rank (alpha = scaling·rank, or scaling·√rank with rsLoRA), so
the kept part of ΔW is exactly what it was. Modules whose ranks differ are written with PEFT's
`rank_pattern` / `alpha_pattern`; everything else in the adapter (saved heads, the config's
other keys, lorafit.json) is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from lorafit.adapter import (CONFIG_FILE, PREFIX, WEIGHTS_FILE, find_adapter, lora_factors, rank_fields,
                             read_adapter_spec, read_adapter_weights, write_adapter_dir)
from lorafit.io import atomic_directory, read_json
from lorafit.lowrank import LoraFactors, RankRule, alpha_for_scaling, energy_kept, factor_svd, truncated_factors
from lorafit.merge import check_output_dir
from lorafit.spectrum import natural_key


@dataclass
class ModuleResize:
    name: str
    rank_before: int
    rank_after: int
    energy_kept: float
    """The share of the module's ‖ΔW‖_F² that the new factors keep."""


@dataclass
class ResizeResult:
    """What `resize_adapter` wrote."""

    output: Path
    rule: str
    modules: list[ModuleResize]
    energy_kept: float
    """The share of Σ‖ΔW‖_F² over all modules that is kept."""
    above_rank: list[str]
    """Modules whose rank was already below --rank: kept as they were."""
    bytes_before: int
    """Size of adapter_model.safetensors (LoRA factors and saved modules) before and after."""
    bytes_after: int
    lora_params_before: int
    lora_params_after: int


def truncate_module(factors: LoraFactors, rule: RankRule) -> tuple[LoraFactors, float, float]:
    """The module cut to the rank `rule` chooses: (new factors, energy kept, energy before).

    A module the rule would not shrink is returned as it is (not re-factored), so nothing changes in it.
    """
    U, S, Vh = factor_svd(factors.A, factors.B, factors.scaling)
    whole = float((S ** 2).sum())
    rank = rule.choose(S)
    if rank >= factors.rank:
        return factors, whole, whole
    A, B = truncated_factors(U, S, Vh, rank, factors.scaling)
    alpha = alpha_for_scaling(factors.scaling, rank, factors.use_rslora)
    return LoraFactors(A, B, alpha, factors.use_rslora), energy_kept(S, rank) * whole, whole


def resize_adapter(adapter: Path, output: Path, rule: RankRule, overwrite: bool = False) -> ResizeResult:
    """Write to `output` the adapter at `adapter` (an adapter or run directory) with its ranks cut by `rule`.

    Raises:
        LorafitError: an adapter that does not read, an output directory that is not free (see
            `merge.check_output_dir`; `overwrite` replaces an existing adapter there).
    """
    source = find_adapter(adapter)
    spec = read_adapter_spec(source)
    weights = read_adapter_weights(source)
    modules = lora_factors(spec, weights, str(source))
    output = Path(output)
    check_output_dir(output, source, overwrite, holds="adapter", marker=CONFIG_FILE)

    tensors = dict(weights)
    resized: dict[str, LoraFactors] = {}
    rows, kept, whole = [], 0.0, 0.0
    for name in sorted(modules, key=natural_key):
        factors, module_kept, module_whole = truncate_module(modules[name], rule)
        resized[name] = factors
        tensors[f"{PREFIX}{name}.lora_A.weight"] = factors.A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = factors.B
        kept, whole = kept + module_kept, whole + module_whole
        rows.append(ModuleResize(name, modules[name].rank, factors.rank,
                                 module_kept / module_whole if module_whole > 0 else 1.0))
    energy = kept / whole if whole > 0 else 1.0
    config = read_json(source / CONFIG_FILE)
    config.update(rank_fields({n: f.rank for n, f in resized.items()}, {n: f.alpha for n, f in resized.items()}))
    meta = {**spec.meta, "resized_from": {"adapter": str(source), "rule": rule.describe(), "energy_kept": energy}}
    with atomic_directory(output) as tmp:
        write_adapter_dir(tmp, config, tensors, meta)
    above = [m for m, f in modules.items() if rule.rank is not None and rule.rank > f.rank]
    return ResizeResult(
        output=output, rule=rule.describe(), modules=rows, energy_kept=energy,
        above_rank=sorted(above, key=natural_key),
        bytes_before=(source / WEIGHTS_FILE).stat().st_size, bytes_after=(output / WEIGHTS_FILE).stat().st_size,
        lora_params_before=sum(f.A.numel() + f.B.numel() for f in modules.values()),
        lora_params_after=sum(f.A.numel() + f.B.numel() for f in resized.values()),
    )


def ranks_table(title: str, rows: list[ModuleResize], energy: float, before: str = "rank before") -> Table:
    """Ranks and kept energy per module, then the totals (`before` names the first rank column)."""
    table = Table(title=title)
    for column in ("module", before, "rank after", "energy kept"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in rows:
        table.add_row(row.name, str(row.rank_before), str(row.rank_after), f"{100 * row.energy_kept:.2f}%")
    table.add_section()
    table.add_row(f"all {len(rows)} modules", str(sum(r.rank_before for r in rows)),
                  str(sum(r.rank_after for r in rows)), f"{100 * energy:.2f}%")
    return table
