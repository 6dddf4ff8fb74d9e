"""`lorafit merge`: fold an adapter into its base model's weights and save a plain Hugging Face model.

The merged directory holds `model.safetensors`, `config.json` (with id2label/label2id for
labelling tasks) and the tokenizer, so the task's `AutoModelFor...` class (`Task.auto_class`, e.g.
`AutoModelForSequenceClassification`) loads it without lorafit or PEFT.
A base model read from a GGUF file is saved the same way, as plain safetensors weights. The
directory also holds `lorafit.json` (task, labels, max_length, the training recipe, where it came
from), which transformers ignores and `lorafit eval`/`predict`/`generate` read.

Merging verifies itself: the task's probe batch (`Task.probe_batch`) goes through the adapter model and through the merged
model as reloaded from the files just written, and the largest logit difference must be within
the dtype's tolerance; the reloaded tokenizer must encode the probe texts (and render a chat) as
the original does. Otherwise nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lorafit import __version__
from lorafit.adapter import find_adapter, load_adapter_model
from lorafit.errors import LorafitError
from lorafit.io import atomic_directory, write_json
from lorafit.lora import lora_layers, merge_lora
from lorafit.models import model_max_length
from lorafit.tasks import get_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META_FILE = "lorafit.json"

# Texts of different lengths, so that padding and the last-token pooling of GPT-2/Llama are probed too.
PROBE_TEXTS = [
    "My SCSI drive will not boot after I installed the new controller card.",
    "The Leafs won in overtime.",
    "Is there any evidence for the claim?",
    "orbit",
    "Please send me the driver for this video card, the one on the ftp site is broken and I need it today.",
]
PROBE_MAX_LENGTH = 64

# The largest |merged - adapter| logit difference allowed on the probe batch.
# fp32: merging only re-associates sums (x·Wᵀ + x·(B·A)ᵀ vs x·(W + B·A)ᵀ), so the merge is
# checked in fp32 first, whatever the output dtype, and must agree to 1e-4: a wrong merge (a
# missed layer, a transposed update, a stale head) fails here. The saved model is then checked
# in its own dtype. bf16 keeps 8 significant bits and fp16 11; through a few layers of
# half-precision matmuls the logits drift by about 2% (bf16) and 0.2% (fp16) of their size on
# the test models, so half precision allows 10% of the logit scale (the largest |logit| of the
# adapter model on the probe batch, at least 1): room for deeper models, and still far below
# the whole-size error of an overflow (inf/NaN) or broken weights.
FP32_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = {"bfloat16": 0.1, "float16": 0.1}


@dataclass
class MergeResult:
    """What `merge_adapter` wrote and how closely the merged model matches the adapter."""

    output: Path
    dtype: str
    merged_layers: int
    max_logit_diff: float
    """Largest |logit| difference between the saved model (in `dtype`) and the adapter model."""
    tolerance: float
    fp32_merge_diff: float
    """The same difference for the merged model in fp32, before the cast."""


def merge_tolerance(dtype: str, reference_logits: torch.Tensor) -> float:
    """The largest logit difference allowed for a model saved in `dtype` (see FP32_TOLERANCE above)."""
    if dtype == "float32":
        return FP32_TOLERANCE
    scale = max(1.0, reference_logits.abs().max().item())
    return RELATIVE_TOLERANCE[dtype] * scale


def check_output_dir(output: Path, adapter_dir: Path | None, overwrite: bool, holds: str = "model",
                     marker: str = "config.json") -> None:
    """Refuse an output directory that holds other files (unless `overwrite`), or the adapter itself.

    With `overwrite`, only a directory that already holds a `holds` (its file `marker`) is
    replaced, so a mistyped `--output .` cannot wipe a folder of other things.
    """
    output = Path(output)
    if adapter_dir is not None:
        resolved, adapter = output.resolve(), Path(adapter_dir).resolve()
        if resolved == adapter or resolved in adapter.parents:
            raise LorafitError(f"--output {output} would replace the adapter {adapter_dir}; choose another directory")
    if output.exists() and not output.is_dir():
        raise LorafitError(f"--output {output} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise LorafitError(f"output directory {output} exists and is not empty; pass --overwrite to replace it")
        if not (output / marker).is_file():
            raise LorafitError(f"output directory {output} is not empty and holds no {holds} (no {marker}); "
                               f"refusing to replace it, choose another directory")


def text_probe_batch(tokenizer, max_length: int, texts: list[str] = PROBE_TEXTS) -> dict[str, torch.Tensor]:
    """The probe texts, padded into one batch: the probe of tasks whose model reads a text (`Task.probe_batch`)."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


PROBE_CHAT = [{"role": "user", "content": PROBE_TEXTS[2]}]


def check_saved_tokenizer(directory: Path, tokenizer, trust_remote_code: bool = False) -> None:
    """The tokenizer as reloaded from `directory` must encode the probe texts, and render a chat
    turn if there is a chat template, to the same ids as `tokenizer` (e.g. one first read from a
    GGUF file), else `LorafitError`."""
    try:
        reloaded = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LorafitError(f"the saved tokenizer does not load ({str(err).splitlines()[0]}); nothing written") from None
    if reloaded(PROBE_TEXTS)["input_ids"] != tokenizer(PROBE_TEXTS)["input_ids"]:
        raise LorafitError("the saved tokenizer encodes the probe texts differently from the original; nothing written")
    if getattr(tokenizer, "chat_template", None):
        render = lambda t: t.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=False)  # noqa: E731
        if not getattr(reloaded, "chat_template", None) or render(reloaded) != render(tokenizer):
            raise LorafitError("the saved tokenizer renders chats differently from the original (chat template "
                               "lost or changed); nothing written")


def merge_adapter(adapter_dir: Path, output: Path, dtype: str = "float32", base: str | None = None,
                  overwrite: bool = False) -> MergeResult:
    """Merge the adapter in `adapter_dir` into its base model and save a plain model to `output`.

    Args:
        adapter_dir: an adapter directory (lorafit's or PEFT's), or a run directory (its `adapter/`).
        output: the directory to write; written atomically, and only if the check passes.
        dtype: "float32", "bfloat16" or "float16": the saved weights' dtype. The merge itself is
            computed in fp32 and cast once.
        base: a base model to use instead of the adapter's `base_model_name_or_path`.
        overwrite: replace an existing model directory at `output`.

    Returns:
        A `MergeResult`, including the largest logit difference on the probe batch.

    Raises:
        LorafitError: an unknown dtype, an output directory that is not free, an adapter that
            does not fit the base, or merged logits beyond the dtype's tolerance.
    """
    if dtype not in DTYPES:
        raise LorafitError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    adapter_dir, output = find_adapter(adapter_dir), Path(output)
    check_output_dir(output, adapter_dir, overwrite)
    model, tokenizer, spec = load_adapter_model(adapter_dir, base)
    task = get_task(spec.task)
    max_length = min(spec.meta.get("max_length") or PROBE_MAX_LENGTH, model_max_length(model) or PROBE_MAX_LENGTH,
                     PROBE_MAX_LENGTH)
    batch = task.probe_batch(tokenizer, max_length)
    reference = task.probe_logits(model, batch)
    merged_layers = len(lora_layers(model))
    # load_adapter_model already put the adapter's saved heads in place; merging folds the rest.
    merge_lora(model)
    fp32_diff = (task.probe_logits(model, batch) - reference).abs().max().item()
    if not fp32_diff <= FP32_TOLERANCE:
        raise LorafitError(f"merged model differs from the adapter in fp32: largest logit difference "
                           f"{fp32_diff:.3g} is above {FP32_TOLERANCE:g}; nothing written")
    model.to(DTYPES[dtype])
    tolerance = merge_tolerance(dtype, reference)
    trust = bool(spec.meta.get("trust_remote_code", False))
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if task.labels_text else None
        write_json(tmp / META_FILE, {
            "lorafit_version": __version__, "task": spec.task, "labels": labels,
            **{k: spec.meta[k] for k in ("max_length", "trust_remote_code", "recipe") if k in spec.meta},
            "merged_from": str(adapter_dir), "base_model": base or spec.base_model, "dtype": dtype,
        })
        # Check the files, not the object in memory: what a user will load is what we compare.
        check_saved_tokenizer(tmp, tokenizer, trust)
        reloaded = task.model_class().from_pretrained(tmp, dtype="auto", trust_remote_code=trust)
        diff = (task.probe_logits(reloaded.eval(), batch) - reference).abs().max().item()
        if not diff <= tolerance:  # `not <=` also catches NaN, e.g. from an fp16 overflow
            raise LorafitError(f"merged model saved in {dtype} differs from the adapter: largest logit difference "
                               f"{diff:.3g} is above the tolerance {tolerance:.3g}; nothing written")
    return MergeResult(output, dtype, merged_layers, diff, tolerance, fp32_diff)
