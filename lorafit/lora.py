"""The LoRA layer, its injection into a model, and merging it back into plain weights.

A wrapped layer computes `y = base(x) + scaling · B(A(dropout(x)))`, with `A` of shape
(rank, in_features) and `B` of shape (out_features, rank), so the weight update is the
rank-limited `scaling · B @ A`. `scaling` is alpha/rank, or alpha/sqrt(rank) with rsLoRA.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.errors import LorafitError
from lorafit.fast import SpeedUp, compute_dtype, probe, probing
from lorafit.lowrank import PRINCIPAL_INITS, LoraFactors, alpha_for_scaling, lora_scaling, principal_factors

# Output heads that "all-linear" never adapts, and that a classification model trains in full.
HEAD_NAMES = ("lm_head", "classifier", "score")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`, whose weight is stored (in, out)) plus a LoRA branch."""

    def __init__(self, base: nn.Linear | Conv1D, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise LorafitError("this layer already has LoRA; a layer can be adapted only once")
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)
        out_features, in_features = self.weight_shape(base)
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device)
        # No dropout module at all when p == 0: nothing to run, nothing to copy.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # PiSSA/OLoRA: the factors the layer started from, whose update `base` had taken out of its
        # weight (see `start_from_principal`); None for a layer whose base is the original weight.
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)
        self.share_autocast_copy = False  # set by `use_shared_autocast_copy` once its probe agrees
        self.reset_lora_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for model code that reads it (T5's MLP casts to `wo.weight.dtype`)."""
        return self.base.weight

    @staticmethod
    def weight_shape(base: nn.Module) -> tuple[int, int]:
        """(out_features, in_features) of a Linear or Conv1D."""
        out_features, in_features = base.weight.shape
        return (in_features, out_features) if isinstance(base, Conv1D) else (out_features, in_features)

    def reset_lora_parameters(self) -> None:
        # A random, B zero: the adapted model starts out equal to the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A in fp32, shaped like `base.weight`."""
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        copy = shared_autocast_copy(x) if self.share_autocast_copy else None
        if copy is not None:
            down = _LoraDown.apply(x, self.lora_A.weight, copy)
        else:
            down = self.lora_A(self.dropout(x))
        return y + self.lora_B(down) * self.scaling


class _SharedCopy:
    """The last autocast copy that `shared_autocast_copy` made, and the tensor it was made from."""

    source: weakref.ref | None = None
    version = -1
    copy: torch.Tensor | None = None


def shared_autocast_copy(x: torch.Tensor) -> torch.Tensor | None:
    """`x` in the autocast dtype, made once for all the LoRA layers that read the same tensor
    (q, k and v; gate and up), or None when autocast would not cast it (or no gradient is needed).

    Under autocast each layer would cast `x` itself, and each LoRA branch would keep its own copy
    for the backward; with the copy shared they keep one.
    """
    dtype = compute_dtype(x)
    if not (torch.is_grad_enabled() and x.is_floating_point()) or dtype == x.dtype:
        return None
    if _SharedCopy.source is not None and _SharedCopy.source() is x and _SharedCopy.version == x._version:
        return _SharedCopy.copy
    with torch.no_grad():
        copy = x.to(dtype)
    _SharedCopy.source, _SharedCopy.version, _SharedCopy.copy = weakref.ref(x), x._version, copy
    return copy


class _LoraDown(torch.autograd.Function):
    """`lora_A(x)` under autocast, computed from `copy` (x already cast, shared between layers).

    The same operations autocast runs: a bf16 matmul forward; backward, the bf16 input gradient
    cast to x's dtype and the bf16 weight gradient cast to the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(copy, weight)
        ctx.x_dtype = x.dtype
        return F.linear(copy, weight.to(copy.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        copy, weight = ctx.saved_tensors
        w = weight.to(copy.dtype)
        grad = grad.to(copy.dtype)
        grad_x = (grad @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ copy.reshape(-1, copy.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


def use_shared_autocast_copy(model: nn.Module, dtype: torch.dtype) -> SpeedUp:
    """Let the LoRA layers without dropout read `shared_autocast_copy` when training under autocast to
    `dtype`, each once a probe shows that `_LoraDown` gives the bits of `lora_A(x)` under that
    autocast: output and the gradients of x and of lora_A. Layers with dropout read their own
    dropped-out input, so there is nothing to share."""
    speed_up = SpeedUp("shared autocast copy")
    if dtype == torch.float32:
        return speed_up
    device = next(model.parameters()).device
    with probing(model), torch.autocast(device.type, dtype=dtype):
        for name, layer in lora_layers(model).items():
            if not isinstance(layer.dropout, nn.Identity):
                continue
            weight = layer.lora_A.weight
            x = torch.randn(2, 3, weight.shape[1], device=device, dtype=weight.dtype)
            difference = probe(layer.lora_A, lambda h: _LoraDown.apply(h, weight, shared_autocast_copy(h)), [x],
                               [weight])
            if difference == 0.0:
                layer.share_autocast_copy = True
                speed_up.patched.append(name)
            else:
                speed_up.declined[name] = f"probe differs by {difference:.0e}"
    return speed_up


@dataclass
class LoraPlan:
    """What `add_lora` did: the adapted modules and what trains."""

    targets: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    fan_in_fan_out: bool
    skipped_targets: list[str] = field(default_factory=list)
    """Layers that `target_modules` selects but that lie inside a module trained in full."""
    not_in_checkpoint: list[str] = field(default_factory=list)
    """Modules of `modules_to_save` whose weights the base checkpoint lacked (random at load)."""


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern given in full or as a dotted suffix, never as a substring."""
    return name == pattern or name.endswith("." + pattern)


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """The value PEFT's `rank_pattern` / `alpha_pattern` give module `name`, else `default`.

    PEFT's rule: each key is a regular expression that must match the end of the module name,
    starting at its beginning or after a dot; the first key (in the mapping's order) that matches wins.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_inside(name: str, modules: Iterable[str]) -> bool:
    """Whether module `name` is one of `modules` (full names) or lies inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's outputs (LM head, classifier)."""
    heads = {name for name, _ in model.named_modules() if name and name.split(".")[-1] in HEAD_NAMES}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output else None
    if output is not None:
        heads |= {name for name, module in model.named_modules() if module is output}
    return heads


def find_targets(model: nn.Module, target_modules: list[str] | str, exclude: list[str] = ()) -> list[str]:
    """Resolve `target_modules` to module names; raise a helpful error when nothing fits."""
    excluded = set(exclude)
    if target_modules == "all-linear":
        excluded |= output_head_names(model)
        found = [n for n, m in model.named_modules() if is_linear(m) and not is_inside(n, excluded)]
        if not found:
            raise LorafitError("lora.target_modules: 'all-linear' found no Linear or Conv1D layers in the model")
        return found
    if isinstance(target_modules, str):
        target_modules = [target_modules]

    named = dict(model.named_modules())
    found = [n for n in named if n and any(matches(n, t) for t in target_modules)]
    if not found:
        linear_names = sorted({n.split(".")[-1] for n, m in named.items() if is_linear(m)})
        raise LorafitError(
            f"lora.target_modules: none of {target_modules} matches a module of the model; "
            f"its linear layers are named {linear_names[:12]}"
        )
    wrapped = [n for n in found if isinstance(named[n], LoRALinear)]
    if wrapped:
        raise LorafitError(f"{wrapped[0]} already has LoRA; a layer can be adapted only once")
    unsupported = [n for n in found if not is_linear(named[n])]
    if unsupported:
        kind = type(named[unsupported[0]]).__name__
        raise LorafitError(
            f"lora.target_modules: {unsupported[0]} is a {kind}; LoRA wraps only Linear and Conv1D layers "
            f"(name the linear layers inside it instead)"
        )
    clash = [n for n in found if is_inside(n, excluded)]
    if clash:
        raise LorafitError(f"lora: {clash[0]} is both a LoRA target and in modules_to_save; pick one")
    return found


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Resolve modules_to_save patterns to module names; every pattern must match something."""
    modules = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pattern in names:
        hits = [n for n in modules if matches(n, pattern)]
        if not hits:
            raise LorafitError(f"lora.modules_to_save: {pattern!r} matches no module of the model")
        found += [h for h in hits if h not in found]
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for module_name in found:
        for param in model.get_submodule(module_name).parameters():
            outside = [n for n in owners[id(param)] if not n.startswith(module_name + ".")]
            if outside:
                raise LorafitError(
                    f"lora.modules_to_save: {module_name} shares its weights with {outside[0].rsplit('.', 1)[0]} "
                    f"(tied embeddings); training it in full would change both, which an adapter cannot express"
                )
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, target_modules: list[str] | str,
             dropout: float = 0.0, use_rslora: bool = False, modules_to_save: list[str] = (),
             required_modules: list[str] = (), rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None) -> LoraPlan:
    """Freeze `model`, wrap its target layers in `LoRALinear`, and unfreeze the modules trained in full.

    Two lists of modules are trained in full (and saved with the adapter): `modules_to_save`, the
    recipe's patterns, and `required_modules`, full names that the model and the adapter format
    impose (modules the checkpoint lacks, and what PEFT wraps with the head). A LoRA target inside
    one of `modules_to_save` is an error; one inside a required module is left out of LoRA, as it
    trains in full anyway, and listed in the plan's `skipped_targets`.

    Each layer gets `rank` and `alpha`, or the values `rank_pattern` / `alpha_pattern` give its
    name (PEFT's keys and matching rule, see `pattern_value`).

    The model is changed in place. Raises `LorafitError` when a target matches nothing, a target
    pattern selects only layers inside required modules, a target is not a linear layer, or a
    layer already has LoRA.
    """
    existing = next((n for n, m in model.named_modules() if isinstance(m, LoRALinear)), None)
    if existing is not None:
        raise LorafitError(f"{existing} already has LoRA; a model takes one adapter, so add LoRA only once")
    explicit = find_modules_to_save(model, list(modules_to_save))
    required = find_modules_to_save(model, [m for m in required_modules if m not in explicit])
    chosen = set(explicit) | set(required)
    # Outermost only: a module inside another one that is saved is saved with it.
    saved = [n for n, _ in model.named_modules() if n in chosen and not is_inside(n.rpartition(".")[0], chosen)]
    selected = find_targets(model, target_modules, exclude=explicit)
    targets = [t for t in selected if not is_inside(t, required)]
    skipped = [t for t in selected if is_inside(t, required)]
    for pattern in [target_modules] if isinstance(target_modules, str) else target_modules:
        hits = selected if pattern == "all-linear" else [t for t in selected if matches(t, pattern)]
        if hits and all(is_inside(t, required) for t in hits):
            owners = [m for m in required if any(is_inside(t, [m]) for t in hits)]
            raise LorafitError(f"lora.target_modules: {pattern!r} selects only layers inside modules that are trained "
                               f"in full ({', '.join(owners)}: the task head, or weights the checkpoint lacks); "
                               f"remove it from lora.target_modules")
    for param in model.parameters():
        param.requires_grad_(False)
    fan_in_fan_out = False
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear) or any(isinstance(m, LoRALinear) for m in base.modules()):
            raise LorafitError(f"{name} already has LoRA; a layer can be adapted only once")
        fan_in_fan_out |= isinstance(base, Conv1D)
        setattr(parent, child, LoRALinear(base, int(pattern_value(rank_pattern or {}, name, rank)),
                                          pattern_value(alpha_pattern or {}, name, alpha), dropout, use_rslora))
    for name in saved:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return LoraPlan(
        targets=targets,
        modules_to_save=saved,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        fan_in_fan_out=fan_in_fan_out,
        skipped_targets=skipped,
    )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_lora_factors(layer: LoRALinear, A: torch.Tensor, B: torch.Tensor) -> None:
    """Give `layer` new trainable factors A (r, in) and B (out, r) of any rank r, keeping its scaling
    (its alpha follows the rank). The parameters are new objects: an optimizer holding the old
    ones must be told (see `rank_schedule.swap_parameters`)."""
    device = layer.lora_A.weight.device
    layer.lora_A.weight = nn.Parameter(A.detach().to(device, torch.float32).contiguous())
    layer.lora_B.weight = nn.Parameter(B.detach().to(device, torch.float32).contiguous())
    layer.lora_A.out_features = layer.lora_B.in_features = A.shape[0]
    layer.rank = A.shape[0]
    layer.alpha = alpha_for_scaling(layer.scaling, layer.rank, layer.use_rslora)


def saved_factors(layer: LoRALinear) -> LoraFactors:
    """The update `layer` makes to the weight it was created on, as a plain LoRA adapter stores it.

    A plain layer: its own factors. A layer started by PiSSA/OLoRA, whose base holds
    W − s·B0·A0: the update to W is s·(B·A − B0·A0) = s·[B, −B0]·[A; A0], a plain LoRA of rank 2r
    at the same scaling, so PEFT, vLLM and `lorafit merge` use it on the unmodified base model.
    """
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    if layer.initial_A is None:
        return LoraFactors(A, B, layer.alpha, layer.use_rslora)
    A, B = torch.cat([A, layer.initial_A]), torch.cat([B, -layer.initial_B], dim=1)
    return LoraFactors(A, B, alpha_for_scaling(layer.scaling, A.shape[0], layer.use_rslora), layer.use_rslora)


def weight_out_in(layer: LoRALinear) -> torch.Tensor:
    """The base weight as (out_features, in_features), whatever the layer type stores."""
    weight = layer.base.weight
    return weight.T if layer.fan_in_fan_out else weight


@torch.no_grad()
def start_from_principal(layer: LoRALinear, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Start `layer` at factors (A0, B0) taken out of its base weight: base becomes W − s·B0·A0,
    computed in fp32 and cast once to W's dtype, so the layer's output is unchanged."""
    weight = layer.base.weight
    residual = weight_out_in(layer).float() - layer.scaling * (B0.float() @ A0.float())
    weight.data = (residual.T if layer.fan_in_fan_out else residual).to(weight.dtype).contiguous()
    layer.lora_A.weight.data = A0.to(layer.lora_A.weight).clone()
    layer.lora_B.weight.data = B0.to(layer.lora_B.weight).clone()
    layer.initial_A, layer.initial_B = A0.float().clone(), B0.float().clone()


LORA_INITS = ("default", "gaussian", *PRINCIPAL_INITS)


def check_principal_init(model: nn.Module, method: str) -> None:
    """Refuse PiSSA/OLoRA on weights it cannot rewrite: quantized (non-float) ones, tied ones
    (shared with another module, e.g. an LM head tied to the embeddings: taking the principal
    part out of one would change the other), and layers whose rank exceeds min(out, in)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for name, layer in lora_layers(model).items():
        weight = layer.base.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LorafitError(f"lora.init: {method} rewrites the base weights, but {name}.weight is {weight.dtype} "
                               f"(quantized); load the model in float32/float16/bfloat16 or use lora.init: default")
        if counts.get(id(weight), 1) > 1:
            raise LorafitError(f"lora.init: {method} cannot start {name}: its weight is tied to another module "
                               f"(shared with the embeddings?), which would change too; leave it out of "
                               f"lora.target_modules or use lora.init: default")
        if layer.rank > min(weight.shape):
            raise LorafitError(f"lora.init: {method} needs a rank of at most min(out, in) = {min(weight.shape)} "
                               f"for {name}, but its rank is {layer.rank}")


@torch.no_grad()
def init_lora(model: nn.Module, method: str, iters: int | None = None) -> None:
    """Initialize every LoRA layer of `model` (after `add_lora`, before training).

    default: A Kaiming-uniform, B zero (what `LoRALinear` does); gaussian: A ~ N(0, 1/r²), B zero;
    pissa / olora: A0, B0 from the principal part of each base weight (its top-r SVD, or its first
    r QR columns; `iters` picks a randomized SVD for pissa), taken out of the base weight (see
    `start_from_principal`). Raises `LorafitError` for weights PiSSA/OLoRA cannot rewrite.
    """
    layers = lora_layers(model)
    if method == "gaussian":
        for layer in layers.values():
            nn.init.normal_(layer.lora_A.weight, std=1 / layer.rank)
            nn.init.zeros_(layer.lora_B.weight)
    elif method in PRINCIPAL_INITS:
        check_principal_init(model, method)
        for layer in layers.values():
            A0, B0 = principal_factors(weight_out_in(layer), layer.rank, layer.scaling, method, iters)
            start_from_principal(layer, A0, B0)
    elif method != "default":
        raise LorafitError(f"lora.init: {method!r} is not one of {', '.join(LORA_INITS)}")


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + scaling · B @ A, summed in fp32 and cast once to W's dtype (transposed for Conv1D)."""
    delta = scaling * (lora_B.float() @ lora_A.float())
    if fan_in_fan_out:
        delta = delta.T
    return (weight.float() + delta).to(weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight and put the plain base layer back in its place.

    Afterwards the model holds no `LoRALinear`, so merging again is a no-op.
    """
    for name, layer in lora_layers(model).items():
        base = layer.base
        base.weight.data = merged_weight(base.weight, layer.lora_A.weight, layer.lora_B.weight,
                                         layer.scaling, layer.fan_in_fan_out)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    return model
