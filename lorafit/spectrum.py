"""`lorafit inspect`: how much rank an adapter uses, module by module.

For each adapted module, with ΔW = scaling · B @ A: its rank, ‖ΔW‖_F, its singular values (from
the factors, `lowrank.singular_values`), the effective rank (entropy-based), the ranks that hold
90% and 99% of ‖ΔW‖_F², and the stable rank. Works on any adapter directory, lorafit's or
PEFT's, from its files alone: no base model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from lorafit.adapter import find_adapter, lora_factors, read_adapter_spec, read_adapter_weights
from lorafit.lowrank import SpectrumStats, singular_values, spectrum_stats
from lorafit.report import save_figure


@dataclass
class ModuleSpectrum:
    """One adapted module's update, as `inspect` reports it."""

    name: str
    rank: int
    alpha: float
    scaling: float
    singular_values: list[float]
    """Descending; there are min(rank, out, in) of them."""
    stats: SpectrumStats


def natural_key(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def adapter_spectra(path: Path) -> list[ModuleSpectrum]:
    """The spectrum of every adapted module of the adapter at `path` (an adapter or a run directory),
    in natural order of module names."""
    directory = find_adapter(path)
    spec = read_adapter_spec(directory)
    modules = lora_factors(spec, read_adapter_weights(directory), str(directory))
    spectra = []
    for name in sorted(modules, key=natural_key):
        factors = modules[name]
        S = singular_values(factors.A, factors.B, factors.scaling)
        spectra.append(ModuleSpectrum(name, factors.rank, factors.alpha, factors.scaling, S.tolist(),
                                      spectrum_stats(S)))
    return spectra


def spectra_json(spectra: list[ModuleSpectrum], adapter: Path) -> dict[str, Any]:
    """What `lorafit inspect --json` prints."""
    return {
        "adapter": str(adapter),
        "total_rank": sum(m.rank for m in spectra),
        "modules": [{"name": m.name, "rank": m.rank, "alpha": m.alpha, "scaling": m.scaling, **asdict(m.stats),
                     "singular_values": m.singular_values} for m in spectra],
    }


def spectra_table(spectra: list[ModuleSpectrum], title: str = "") -> Table:
    """One row per module, then the totals (ranks summed, the norm of all updates together)."""
    table = Table(title=title or None)
    # On a narrow terminal long module names fold onto more lines; numbers are never cut.
    table.add_column("module", overflow="fold")
    for column in ("rank", "‖ΔW‖_F", "σ_max", "eff. rank", "r 90%", "r 99%", "stable rank"):
        table.add_column(column, justify="right", no_wrap=True)
    for m in spectra:
        top = m.singular_values[0] if m.singular_values else 0.0
        table.add_row(m.name, str(m.rank), f"{m.stats.norm:.4g}", f"{top:.4g}", f"{m.stats.effective_rank:.2f}",
                      str(m.stats.rank_90), str(m.stats.rank_99), f"{m.stats.stable_rank:.2f}")
    table.add_section()
    whole = sum(m.stats.norm ** 2 for m in spectra) ** 0.5
    table.add_row(f"all {len(spectra)} modules", str(sum(m.rank for m in spectra)), f"{whole:.4g}", "", "",
                  str(sum(m.stats.rank_90 for m in spectra)), str(sum(m.stats.rank_99 for m in spectra)), "")
    return table


def plot_spectra(spectra: list[ModuleSpectrum], path: Path, title: str = "") -> Path:
    """A PNG: a module × index heat map of σ_i / σ_max (blank past a module's rank; a red tick
    where 90% of its energy is reached), and beside it each module's ‖ΔW‖_F."""
    import numpy as np
    from matplotlib.figure import Figure

    width = max((len(m.singular_values) for m in spectra), default=1)
    grid = np.full((len(spectra), width), np.nan)
    for row, m in enumerate(spectra):
        if m.singular_values and m.singular_values[0] > 0:
            grid[row, :len(m.singular_values)] = np.array(m.singular_values) / m.singular_values[0]
    height = min(40.0, 1.6 + 0.2 * len(spectra))
    fig = Figure(figsize=(12, height), layout="constrained")
    ax_map, ax_norm = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    image = ax_map.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
    for row, m in enumerate(spectra):
        if m.stats.rank_90:
            ax_map.plot([m.stats.rank_90 - 0.5] * 2, [row - 0.45, row + 0.45], color="red", linewidth=1.5)
    fig.colorbar(image, ax=ax_map, shrink=0.6, label="σ_i / σ_max")
    font = 8 if len(spectra) <= 40 else 5
    ax_map.set_yticks(range(len(spectra)), [m.name for m in spectra], fontsize=font)
    ax_map.set_xticks(range(width), [str(i + 1) for i in range(width)], fontsize=font)
    ax_map.set(xlabel="singular value index (red: 90% of the energy)", title="spectrum of ΔW per module")
    ax_norm.barh(range(len(spectra)), [m.stats.norm for m in spectra], color="tab:blue")
    ax_norm.set(xlabel="‖ΔW‖_F", title="size of the update")
    ax_norm.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, Path(path))
