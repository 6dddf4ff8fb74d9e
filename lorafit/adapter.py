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
from lorafit.lora import LoraPlan, add_lora, is_inside, is_linear, lora_layers, matches
from lorafit.models import load_model, load_tokenizer, resolve_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "lorafit.json"
PREFIX = "base_model.model."
PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
# Names that PEFT's model class for the task adds to modules_to_save itself, in training and in loading.
PEFT_TASK_MODULES = {"sequence-classification": ("classifier", "score"), "causal-lm": ()}
# Options of PEFT's LoraConfig that change the math; lorafit refuses adapters that use them.
UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
               "layers_to_transform": None, "target_parameters": None, "trainable_token_indices": None}


@dataclass
class AdapterSpec:
    """The LoRA hyper-parameters an adapter was trained with."""

    base_model: str
    task: str
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    modules_to_save: list[str]
    use_rslora: bool = False
    labels: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def adapter_state_dict(model: nn.Module, plan: LoraPlan) -> dict[str, torch.Tensor]:
    """The tensors of an adapter under PEFT's key names (no adapter name in keys)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    for name in plan.modules_to_save:
        for param_name, param in model.get_submodule(name).named_parameters():
            state[f"{PREFIX}{name}.{param_name}"] = param
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def peft_modules_to_save(model: nn.Module, names: list[str], task: str) -> list[str]:
    """The modules that PEFT trains in full and saves for `modules_to_save=names` on a model for `task`.

    PEFT takes every module whose name ends with one of `names` or of its own names for the task
    (PEFT_TASK_MODULES), comparing plain strings with no dot boundary: `classifier` takes
    DistilBERT's `pre_classifier` too. An adapter must save exactly these, or PEFT cannot load it.
    Outermost modules only, in model order.
    """
    endings = (*names, *PEFT_TASK_MODULES[task])
    hits = {n for n, _ in model.named_modules() if n and n.endswith(endings)}
    return [n for n, _ in model.named_modules() if n in hits and not is_inside(n.rpartition(".")[0], hits)]


def compact_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest faithful `target_modules`: leaf names if they select exactly `targets`, else full names."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    # Name adapted layers as PEFT sees them: the wrapper's name, not `<name>.base`; skip lora_A/B.
    linear = {n.removesuffix(".base") for n, m in model.named_modules()
              if is_linear(m) and not n.endswith((".lora_A", ".lora_B"))}
    selected = {n for n in linear if any(matches(n, leaf) for leaf in leaves)}
    return leaves if selected == set(targets) else sorted(targets)


def save_adapter(directory: Path, model: nn.Module, plan: LoraPlan, spec: AdapterSpec) -> Path:
    """Write the adapter atomically to `directory` (replacing an older one there)."""
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, model, plan, spec)
    return Path(directory)


def write_adapter_files(directory: Path, model: nn.Module, plan: LoraPlan, spec: AdapterSpec) -> None:
    """Write the three adapter files into an existing directory (callers make it atomic)."""
    config = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[spec.task],
        "base_model_name_or_path": spec.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": compact_targets(model, plan.targets),
        "modules_to_save": plan.modules_to_save or None,
        "fan_in_fan_out": plan.fan_in_fan_out,
        "bias": "none",
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    meta = {"lorafit_version": __version__, "task": spec.task, "labels": spec.labels, **spec.meta}
    directory = Path(directory)
    save_file(adapter_state_dict(model, plan), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, config)
    write_json(directory / META_FILE, meta)


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
    tasks = {v: k for k, v in PEFT_TASK_TYPES.items()}
    task = meta.get("task") or tasks.get(config.get("task_type"))
    if task is None:
        raise LorafitError(f"{directory / CONFIG_FILE}: task_type {config.get('task_type')!r} is not supported")
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
            # LoRALinear keeps its parameters directly; saved heads keep their own names.
            params[name].copy_(tensor.to(params[name].dtype))


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
    spec = read_adapter_spec(directory)
    weights = read_adapter_weights(directory)
    trust = bool(spec.meta.get("trust_remote_code", False))
    source = resolve_model(base or spec.base_model, trust_remote_code=trust)
    tokenizer = load_tokenizer(source, trust_remote_code=trust)
    labels = spec.labels
    if spec.task == "sequence-classification" and not labels:
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
                    dropout=spec.dropout, use_rslora=spec.use_rslora, required_modules=saved)
    load_adapter_weights(model, plan, weights, str(directory))
    model.eval()
    return model, tokenizer, spec
