"""`lorafit extract`: a LoRA adapter from a fully fine-tuned model.

For every adapted linear layer, ΔW = W_tuned − W_base is replaced by its truncated SVD at the
rank the rule chooses (`lowrank.RankRule`: `--rank` or `--energy`), the best approximation at
that rank, with √σ on both factors and alpha = rank (scaling 1). Parameters outside those
layers are saved in full only for the modules asked for (`--save-module`) and, by default, the
classification head a classifier needs; any other parameter that changed is reported, since the
adapter cannot carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.pytorch_utils import Conv1D

from lorafit.adapter import (CONFIG_FILE, PREFIX, AdapterSpec, adapter_config, adapter_meta, compact_targets,
                             peft_modules_to_save, write_adapter_dir)
from lorafit.errors import LorafitError
from lorafit.io import atomic_directory, read_json
from lorafit.lora import find_modules_to_save, find_targets
from lorafit.lowrank import LoraFactors, RankRule, energy_kept, truncated_factors
from lorafit.merge import META_FILE, check_output_dir
from lorafit.models import load_model, load_tokenizer, resolve_model
from lorafit.resize import ModuleResize
from lorafit.spectrum import natural_key
from lorafit.tasks import Task, all_tasks


@dataclass
class ExtractResult:
    """What `extract_adapter` wrote."""

    output: Path
    rule: str
    modules: list[ModuleResize]
    """Per adapted layer: the full rank min(out, in) of ΔW, the rank kept, the share of ‖ΔW‖_F² kept."""
    energy_kept: float
    """The share of Σ‖ΔW‖_F² over the adapted layers that the adapter keeps."""
    saved_modules: list[str]
    unsaved_changes: dict[str, float]
    """Parameters outside the adapted layers and saved modules that changed: name -> largest |change|."""


def tuned_task(config) -> Task:
    """The task whose model class the architecture a model's config names belongs to (`Task.claims`)."""
    task = next((t for t in all_tasks() if t.claims(config.to_dict())), None)
    if task is None:
        classes = " or ".join(t.auto_class for t in all_tasks())
        raise LorafitError(f"--tuned: cannot tell what the model does from its config (architectures "
                           f"{getattr(config, 'architectures', None) or []}); extract takes a model of {classes}")
    return task


def check_same_shapes(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    """Both models must have the same tensors with the same shapes; else name the first that differs."""
    for key in dict.fromkeys([*base, *tuned]):
        if key not in tuned or key not in base:
            where = "--base but not in --tuned" if key in base else "--tuned but not in --base"
            raise LorafitError(f"--base and --tuned are different architectures: {key} is in {where}")
        if base[key].shape != tuned[key].shape:
            raise LorafitError(f"--base and --tuned differ in shape: {key} is {tuple(base[key].shape)} in --base "
                               f"and {tuple(tuned[key].shape)} in --tuned")


def extract_adapter(base: str, tuned: str, output: Path, rule: RankRule, save_modules: list[str] = (),
                    target_modules: list[str] | str = "all-linear", overwrite: bool = False) -> ExtractResult:
    """Write to `output` a LoRA adapter for `base` whose update approximates `tuned` − `base`.

    Args:
        base, tuned: model directories or hub ids; `tuned` must name its task in its config
            (e.g. `...ForSequenceClassification` or `...ForCausalLM`), as `save_pretrained` writes it.
        rule: how each layer's rank is chosen (`rank` or `energy`).
        save_modules: modules saved in full besides a classifier's head.
        target_modules: the layers to adapt, as `lora.target_modules` takes them.
        overwrite: replace an existing adapter at `output`.

    Raises:
        LorafitError: models that do not load or do not match (naming the first tensor that
            differs), a ratio rule, an output directory that is not free.
    """
    if rule.ratio is not None:
        raise LorafitError("extract takes --rank or --energy (a ratio of singular values means little for a "
                           "dense difference, whose spectrum has no gap to find)")
    output = Path(output)
    check_output_dir(output, None, overwrite, holds="adapter", marker=CONFIG_FILE)
    tuned_source, base_source = resolve_model(str(tuned)), resolve_model(str(base))
    config = AutoConfig.from_pretrained(tuned_source.path, **tuned_source.kwargs)
    task = tuned_task(config)
    labels = [config.id2label[i] for i in range(config.num_labels)] if task.labels_text else None
    tokenizer = load_tokenizer(tuned_source)
    tuned_model, _ = load_model(tuned_source, task.name, tokenizer, labels)
    base_model, base_lacks = load_model(base_source, task.name, tokenizer, labels)
    tuned_state, base_state = tuned_model.state_dict(), base_model.state_dict()
    check_same_shapes(base_state, tuned_state)

    # Saved in full: the modules asked for, those the base checkpoint lacks (a task head), and what
    # PEFT wraps with them (see `peft_modules_to_save`).
    saved = peft_modules_to_save(tuned_model, find_modules_to_save(tuned_model, list(save_modules)) + base_lacks,
                                 task.name)
    targets = find_targets(tuned_model, target_modules, exclude=saved)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, LoraFactors] = {}
    rows, kept, whole = [], 0.0, 0.0
    fan_in_fan_out = False
    for name in sorted(targets, key=natural_key):
        layer = tuned_model.get_submodule(name)
        delta = tuned_state[f"{name}.weight"].float() - base_state[f"{name}.weight"].float()
        if isinstance(layer, Conv1D):  # GPT-2 stores (in, out)
            delta, fan_in_fan_out = delta.T, True
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        rank = rule.choose(S)
        A, B = truncated_factors(U, S, Vh, rank, scaling=1.0)
        modules[name] = LoraFactors(A, B, alpha=float(rank))
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = A, B
        module_whole = float((S.double() ** 2).sum())
        kept, whole = kept + energy_kept(S, rank) * module_whole, whole + module_whole
        rows.append(ModuleResize(name, len(S), rank, energy_kept(S, rank)))
    for name in saved:
        for param_name, param in tuned_model.get_submodule(name).named_parameters():
            tensors[f"{PREFIX}{name}.{param_name}"] = param
    covered = tuple(f"{name}." for name in saved) + tuple(f"{name}.weight" for name in targets)
    unsaved = {key: float((tuned_state[key].float() - base_state[key].float()).abs().max()) for key in tuned_state
               if not key.startswith(covered) and not torch.equal(tuned_state[key], base_state[key])}

    energy = kept / whole if whole > 0 else 1.0
    meta_path = Path(tuned_source.path) / META_FILE  # a model lorafit merged carries its recipe
    meta = read_json(meta_path) if meta_path.is_file() else {}
    spec = AdapterSpec(base_model=str(base), task=task.name, rank=0, alpha=0.0, dropout=0.0, target_modules=targets,
                       modules_to_save=saved, labels=labels,
                       meta={**{k: meta[k] for k in ("max_length", "trust_remote_code", "recipe") if k in meta},
                             "extracted_from": {"base": str(base), "tuned": str(tuned), "rule": rule.describe(),
                                                "energy_kept": energy}})
    config_json = adapter_config(spec, compact_targets(tuned_model, targets), saved, fan_in_fan_out, modules)
    with atomic_directory(output) as tmp:
        write_adapter_dir(tmp, config_json, tensors, adapter_meta(spec))
    return ExtractResult(output, rule.describe(), rows, energy, saved, unsaved)
