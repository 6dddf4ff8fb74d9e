"""Adapters on disk, in PEFT's format, so PEFT, vLLM and TGI load them and we load theirs.

An adapter directory holds:
- `adapter_config.json`: PEFT's LoraConfig keys only (PEFT warns on unknown ones);
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` (rank, in) and
  `...lora_B.weight` (out, rank) per adapted layer, and `base_model.model.<module>.<param>` for
  each module saved in full (the classification head, every module the base checkpoint lacks);
- `lorafit.json`: lorafit's own metadata (task, label names, max_length, the recipe). Optional
  when loading, so adapters that PEFT wrote load too.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.io import atomic_directory, read_json, write_json
from lorafit.lora import (LoraPlan, add_lora, is_inside, is_linear, lora_layers, matches, pattern_value, saved_factors,
                          set_lora_factors, start_from_principal)
from lorafit.lowrank import LoraFactors
from lorafit.tasks import get_task, task_for_peft_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "lorafit.json"
PREFIX = "base_model.model."
# Options of PEFT's LoraConfig that change the math; lorafit refuses adapters that use them.
UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False,
               "layers_to_transform": None, "target_parameters": None, "trainable_token_indices": None}
# PEFT inits that rewrite the base weights: an adapter saved from them without PEFT's conversion
# (`path_initial_model_for_weight_conversion`) is only right on PEFT's rewritten base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class AdapterSpec:
    """The LoRA hyper-parameters an adapter was trained with."""

    base_model: str
    task: str
    """The task's name (`lorafit.tasks`)."""
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    modules_to_save: list[str]
    use_rslora: bool = False
    labels: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Ranks of modules that differ from `rank`: PEFT's keys, matched by `lora.pattern_value`."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def adapter_state_dict(model: nn.Module, plan: LoraPlan) -> dict[str, torch.Tensor]:
    """The tensors of an adapter under PEFT's key names (no adapter name in keys).

    Layers started by PiSSA/OLoRA are written as the plain LoRA of their update to the original
    base weight (`lora.saved_factors`).
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        factors = saved_factors(layer)
        state[f"{PREFIX}{name}.lora_A.weight"] = factors.A
        state[f"{PREFIX}{name}.lora_B.weight"] = factors.B
    for name in plan.modules_to_save:
        for param_name, param in model.get_submodule(name).named_parameters():
            state[f"{PREFIX}{name}.{param_name}"] = param
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def peft_modules_to_save(model: nn.Module, names: list[str], task: str) -> list[str]:
    """The modules that PEFT trains in full and saves for `modules_to_save=names` on a model for `task`.

    PEFT takes every module whose name ends with one of `names` or of its own names for the task
    (`Task.peft_head_modules`), comparing plain strings with no dot boundary: `classifier` takes
    DistilBERT's `pre_classifier` too. An adapter must save exactly these, or PEFT cannot load it.
    Outermost modules only, in model order.
    """
    endings = (*names, *get_task(task).peft_head_modules)
    hits = {n for n, _ in model.named_modules() if n and n.endswith(endings)}
    return [n for n, _ in model.named_modules() if n in hits and not is_inside(n.rpartition(".")[0], hits)]


def lora_factors(spec: AdapterSpec, weights: dict[str, torch.Tensor],
                 source: str = "adapter") -> dict[str, LoraFactors]:
    """Each adapted module's factors and alpha, read from an adapter's tensors and config, no model needed.

    A module's rank is its tensors' (checked against `rank_pattern`); its alpha is `alpha_pattern`'s or `alpha`.
    """
    modules: dict[str, LoraFactors] = {}
    for key in weights:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PREFIX):-len(".lora_A.weight")]
        B = weights.get(f"{PREFIX}{name}.lora_B.weight")
        if B is None:
            raise LorafitError(f"{source}: {key} has no matching {PREFIX}{name}.lora_B.weight")
        A = weights[key]
        rank = int(pattern_value(spec.rank_pattern, name, spec.rank))
        if A.shape[0] != rank or B.shape[1] != A.shape[0]:
            raise LorafitError(f"{source}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                               f"but the config gives it rank {rank}")
        modules[name] = LoraFactors(A, B, float(pattern_value(spec.alpha_pattern, name, spec.alpha)), spec.use_rslora)
    orphans = [k for k in weights if k.endswith(".lora_B.weight")
               and k[len(PREFIX):-len(".lora_B.weight")] not in modules]
    if orphans:
        raise LorafitError(f"{source}: {orphans[0]} has no matching lora_A tensor")
    return modules


def _most_common(values: list[float]) -> float:
    """The most frequent value; ties go to the largest."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def rank_fields(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """PEFT's `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` for per-module ranks and alphas.

    `r` and `lora_alpha` are the most common values; the patterns list the modules that differ,
    by full module name. If a plain name would also match another module under PEFT's rule
    (`lora.pattern_value`: keys are regular expressions matched at a dotted suffix), every key is
    written as an anchored, escaped regular expression that matches its module alone.
    """
    defaults, patterns = {}, {}
    for field_name, pattern_name, values in (("r", "rank_pattern", ranks), ("lora_alpha", "alpha_pattern", alphas)):
        default = _most_common(list(values.values()))
        pattern = {name: value for name, value in values.items() if value != default}
        if any(pattern_value(pattern, name, default) != value for name, value in values.items()):
            pattern = {f"^{re.escape(name)}": value for name, value in pattern.items()}
        defaults[field_name], patterns[pattern_name] = default, pattern
    return {**defaults, **patterns}


def compact_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest faithful `target_modules`: leaf names if they select exactly `targets`, else full names."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    # Every module as PEFT sees the base model (the wrappers' insides are not there): PEFT and
    # `find_targets` refuse a name that also selects a module LoRA cannot wrap, such as the "0" of
    # a ModuleList of Linears, which also names decoder layer 0.
    wrappers = lora_layers(model)
    names = {n for n, _ in model.named_modules() if n and not is_inside(n.rpartition(".")[0], wrappers)}
    selected = {n for n in names if any(matches(n, leaf) for leaf in leaves)}
    return leaves if selected == set(targets) else sorted(targets)


def save_adapter(directory: Path, model: nn.Module, plan: LoraPlan, spec: AdapterSpec) -> Path:
    """Write the adapter atomically to `directory` (replacing an older one there)."""
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, model, plan, spec)
    return Path(directory)


def adapter_config(spec: AdapterSpec, target_modules: list[str] | str, modules_to_save: list[str],
                   fan_in_fan_out: bool, modules: dict[str, LoraFactors]) -> dict[str, Any]:
    """PEFT's adapter_config.json for adapted `modules` (their ranks and alphas give r, lora_alpha
    and the patterns) and the rest of `spec`."""
    return {
        "peft_type": "LORA",
        "task_type": get_task(spec.task).peft_task_type,
        "base_model_name_or_path": spec.base_model,
        **rank_fields({n: f.rank for n, f in modules.items()}, {n: f.alpha for n, f in modules.items()}),
        "lora_dropout": spec.dropout,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_meta(spec: AdapterSpec) -> dict[str, Any]:
    """lorafit.json: lorafit's version, the task, the label names and `spec.meta`."""
    return {"lorafit_version": __version__, "task": spec.task, "labels": spec.labels, **spec.meta}


def write_adapter_dir(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any]) -> None:
    """Write an adapter's three files into an existing directory (callers make it atomic): a model-free
    writer, for adapters built from tensors (resize, extract) as much as from a model."""
    directory = Path(directory)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, config)
    write_json(directory / META_FILE, meta)


def write_adapter_files(directory: Path, model: nn.Module, plan: LoraPlan, spec: AdapterSpec) -> None:
    """Write the adapter of a model prepared by `add_lora` into an existing directory (callers make it atomic).

    Ranks and alphas are the layers' own (they may differ per layer: a rank schedule, a PiSSA
    conversion), written as PEFT's `rank_pattern` / `alpha_pattern` where they differ.
    """
    modules = {name: saved_factors(layer) for name, layer in lora_layers(model).items()}
    config = adapter_config(spec, compact_targets(model, plan.targets), plan.modules_to_save, plan.fan_in_fan_out,
                            modules)
    write_adapter_dir(directory, config, adapter_state_dict(model, plan), adapter_meta(spec))


def find_adapter(path: Path) -> Path:
    """The adapter directory `path` names: itself, or the `adapter/` of a run directory."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "adapter" / CONFIG_FILE).is_file():
        return path / "adapter"
    return path


def read_adapter_spec(directory: Path) -> AdapterSpec:
    """Read and check an adapter directory's config (ours or PEFT's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorafitError(f"adapter directory not found: {directory}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise LorafitError(f"{directory} is not a complete adapter: {required} is missing")
    config = read_json(directory / CONFIG_FILE)
    meta = read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    if config.get("peft_type") != "LORA":
        raise LorafitError(f"{directory / CONFIG_FILE}: peft_type is {config.get('peft_type')!r}; lorafit loads LORA adapters")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, {}, False):
            raise LorafitError(f"{directory / CONFIG_FILE}: {key}={config[key]!r} is not supported by lorafit (plain LoRA only)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_REWRITING_INITS):
        raise LorafitError(f"{directory / CONFIG_FILE}: init_lora_weights={init!r}: this adapter works only on "
                           f"the base weights PEFT rewrote at its init; save it from PEFT with "
                           f"path_initial_model_for_weight_conversion to get a plain LoRA for the original base")
    task = meta.get("task")
    if task is None:  # PEFT's adapter: its task_type names the task
        known = task_for_peft_type(config.get("task_type"))
        if known is None:
            raise LorafitError(f"{directory / CONFIG_FILE}: task_type {config.get('task_type')!r} is not supported")
        task = known.name
    try:
        return AdapterSpec(
            base_model=config["base_model_name_or_path"],
            task=task,
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=config["target_modules"],
            modules_to_save=list(config.get("modules_to_save") or []),
            use_rslora=bool(config.get("use_rslora", False)),
            labels=meta.get("labels"),
            meta=meta,
            rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LorafitError(f"{directory / CONFIG_FILE}: missing or invalid entry {err}") from None


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise LorafitError(f"{path}: cannot read it, the file is corrupted or truncated ({err})") from None


def load_adapter_weights(model: nn.Module, plan: LoraPlan, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into a model prepared by `add_lora`; every key must fit exactly."""
    expected = adapter_state_dict(model, plan)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise LorafitError(f"{source}: adapter does not fit the model: keys " + ", ".join(parts))
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LorafitError(
                f"{source}: adapter does not fit the base model: {key} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(expected[key].shape)}"
            )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in weights.items():
            name = key[len(PREFIX):]
            # LoRALinear keeps its parameters directly; saved heads keep their own names. A layer
            # started by PiSSA/OLoRA is saved as [A; A0] and [B, −B0]: its parameters are the leading block.
            param = params[name]
            param.copy_(tensor[tuple(slice(0, n) for n in param.shape)].to(param.dtype))


def load_checkpoint_adapter(model: nn.Module, plan: LoraPlan, checkpoint: Path, principal: bool = False) -> None:
    """Load a training checkpoint's adapter into a model fresh from `add_lora`, to resume training.

    Layers whose rank a rank schedule cut are rebuilt at the checkpoint's rank first. With
    `principal` (a PiSSA/OLoRA run, before any init ran), each saved [A; A0], [B, −B0] is split
    again: A0, B0 go back into the base weight as the run's start did (`start_from_principal`, the
    same fp32 arithmetic on the same numbers, so the base is bit-for-bit the run's) and A, B
    are the trained factors.
    """
    weights = read_adapter_weights(checkpoint)
    for name, layer in lora_layers(model).items():
        key_a, key_b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        if key_a not in weights or key_b not in weights:
            continue  # load_adapter_weights names the missing key
        A, B = weights[key_a], weights[key_b]
        if principal:
            r = A.shape[0] // 2
            start_from_principal(layer, A[r:], -B[:, r:])
        elif A.shape[0] != layer.rank:
            set_lora_factors(layer, A, B)
    load_adapter_weights(model, plan, weights, str(checkpoint))


def _labels_from_head(weights: dict[str, torch.Tensor], modules_to_save: list[str]) -> list[str] | None:
    """For adapters without lorafit.json: the number of classes is the saved head's output size."""
    for key, tensor in reversed(list(weights.items())):
        if key.endswith(".weight") and tensor.ndim == 2 and any(f".{m}." in f".{key}" for m in modules_to_save):
            return [f"LABEL_{i}" for i in range(tensor.shape[0])]
    return None


def resolve_peft_targets(model: nn.Module, target_modules: list[str] | str) -> list[str] | str:
    """PEFT reads a string other than "all-linear" as a regex over full module names."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return [n for n, _ in model.named_modules() if n and re.fullmatch(target_modules, n)]
    return target_modules


def load_adapter_model(directory: Path, base: str | None = None):
    """Load the base model an adapter was trained on, add LoRA and load the adapter's weights.

    Returns (model, tokenizer, spec). `base` overrides the base model recorded in the adapter.
    """
    from lorafit.models import load_model, load_tokenizer, resolve_model  # transformers' model code: seconds to import

    spec = read_adapter_spec(directory)
    weights = read_adapter_weights(directory)
    trust = bool(spec.meta.get("trust_remote_code", False))
    source = resolve_model(base or spec.base_model, trust_remote_code=trust)
    tokenizer = load_tokenizer(source, trust_remote_code=trust)
    labels = spec.labels
    if get_task(spec.task).labels_text and not labels:
        labels = _labels_from_head(weights, spec.modules_to_save)
        if labels is None:
            raise LorafitError(f"{directory}: cannot tell the number of classes (no lorafit.json, no saved head)")
        spec.labels = labels
    model, not_loaded = load_model(source, spec.task, tokenizer, labels, trust_remote_code=trust)
    saved = peft_modules_to_save(model, spec.modules_to_save, spec.task)  # as PEFT reads the adapter
    lost = [m for m in not_loaded if not is_inside(m, saved)]
    if lost:
        raise LorafitError(f"{directory}: adapter does not fit the base model: the base checkpoint lacks {lost[0]} "
                           f"(random at every load) and the adapter does not save it; train the adapter again, or "
                           f"pass --base with a checkpoint that has it")
    plan = add_lora(model, spec.rank, spec.alpha, resolve_peft_targets(model, spec.target_modules),
                    dropout=spec.dropout, use_rslora=spec.use_rslora, required_modules=saved,
                    rank_pattern=spec.rank_pattern, alpha_pattern=spec.alpha_pattern)
    load_adapter_weights(model, plan, weights, str(directory))
    model.eval()
    return model, tokenizer, spec
