"""Rank that shrinks during training: `lora.rank_schedule`.

Training starts at `lora.rank` everywhere. After each optimizer step the schedule names, every
module's update ΔW = s·B·A is truncated by SVD (Eckart-Young, from the factors) so that the
ranks add up to the step's budget, mean rank × the number of adapted modules. The budget is
shared between modules by singular-value energy (`lowrank.allocate_ranks`): each module keeps
its top singular value, the rest go to the largest σ² anywhere, so modules whose update is
spread over many directions keep more rank than modules whose update is nearly rank one. That
is AdaLoRA's idea (a global budget, reallocated as training goes) with plain LoRA factors and
the update's own spectrum as the importance score. The result is a `rank_pattern` adapter.

Optimizer state across a cut: the factors of every module whose rank changes are replaced, and
their optimizer state (Adam's moments, SGD's momentum) is reset; every other parameter (modules
whose rank stays, the head) keeps its state, and the learning-rate schedule goes on. The state
cannot be carried over: the new factors U_k·√S and √S·V_kᵀ are a rotation of the old ones, so
the old per-coordinate moments describe other coordinates, and Adam's second moment (squared
gradients, coordinate by coordinate) has no transform into the new basis. Restarting the moments
costs Adam its first-step behaviour for those factors: a step of about lr per coordinate while
the moments rebuild, as at the start of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora import lora_layers, set_lora_factors
from lorafit.lowrank import allocate_ranks, factor_svd, truncated_factors


@dataclass
class RankCut:
    """What a cut did."""

    total_before: int
    total_after: int
    ranks: dict[str, int]
    """Every module's rank after the cut."""
    energy_kept: float
    """The share of Σ‖ΔW‖_F² over all modules that the cut kept."""


@torch.no_grad()
def cut_ranks(model: nn.Module, total: int) -> tuple[RankCut, dict[nn.Parameter, nn.Parameter]]:
    """Truncate the LoRA layers of `model` to ranks that add up to `total` (see the module docstring).

    Layers whose rank changes get new factors (the best approximation of their ΔW at the new
    rank, with the same scaling); the others are left untouched. Returns the cut and the
    replaced parameters, {old: new}, for `swap_parameters`.
    """
    layers = lora_layers(model)
    svds = {name: factor_svd(layer.lora_A.weight, layer.lora_B.weight, layer.scaling) for name, layer in layers.items()}
    ranks = allocate_ranks({name: S for name, (_, S, _) in svds.items()}, total)
    replaced: dict[nn.Parameter, nn.Parameter] = {}
    kept = whole = 0.0
    total_before = sum(layer.rank for layer in layers.values())
    for name, layer in layers.items():
        U, S, Vh = svds[name]
        kept += float((S[:ranks[name]] ** 2).sum())
        whole += float((S ** 2).sum())
        if ranks[name] < layer.rank:
            old = (layer.lora_A.weight, layer.lora_B.weight)
            set_lora_factors(layer, *truncated_factors(U, S, Vh, ranks[name], layer.scaling))
            replaced.update({old[0]: layer.lora_A.weight, old[1]: layer.lora_B.weight})
    cut = RankCut(total_before, sum(layer.rank for layer in layers.values()),
                  {name: layer.rank for name, layer in layers.items()}, kept / whole if whole > 0 else 1.0)
    return cut, replaced


def swap_parameters(optimizer: torch.optim.Optimizer, replaced: dict[nn.Parameter, nn.Parameter],
                    params: list[nn.Parameter]) -> None:
    """Put the new parameters in the old ones' places, in `optimizer`'s groups (same group, same
    position, so hyper-parameters and checkpoint indices stay) and in `params`; the old ones'
    optimizer state is dropped (see the module docstring for why)."""
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(p, p) for p in group["params"]]
    for old in replaced:
        optimizer.state.pop(old, None)
    params[:] = [replaced.get(p, p) for p in params]


def apply_rank_schedule(model: nn.Module, schedule: dict[int, float], step: int, total_steps: int,
                        optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
                        console: Console) -> RankCut | None:
    """Called after every optimizer step: at a step `schedule` names, cut the ranks to its budget
    and hand the new factors to `optimizer` and `trainable` (the list gradients are clipped over).

    Raises `LorafitError` when the schedule names a step past the run's last one (it would never happen).
    """
    if not schedule:
        return None
    late = [s for s in schedule if s > total_steps]
    if late:
        raise LorafitError(f"lora.rank_schedule: step {max(late)} is past the end of the run ({total_steps} steps); "
                           f"cut earlier or train longer")
    if step not in schedule:
        return None
    layers = len(lora_layers(model))
    cut, replaced = cut_ranks(model, round(schedule[step] * layers))
    swap_parameters(optimizer, replaced, trainable)
    ranks = list(cut.ranks.values())
    console.print(f"step {step}: ranks cut from {cut.total_before} to {cut.total_after} in all "
                  f"(mean {cut.total_after / layers:.3g} over {layers} modules, each {min(ranks)}-{max(ranks)}), "
                  f"keeping {100 * cut.energy_kept:.2f}% of the update's energy")
    return cut
