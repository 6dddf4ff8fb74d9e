"""List the sequence-classification architectures of the installed transformers whose head is
more than one module, or is not named `classifier` / `score` (PEFT's own head names).

The head is every parameter outside the model's `base_model_prefix`, grouped by the module that
owns it: DistilBERT's is `pre_classifier` + `classifier`, RoBERTa's `classifier.dense` +
`classifier.out_proj`. A real pretrained checkpoint holds none of it, so lorafit must train and
save all of it. Each model is built from its default config on the meta device (no memory, no
weights), so the whole list takes seconds:

    python scripts/head_architectures.py

tests/test_heads.py tests the architectures listed here (its docstring records the list).
"""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


# Default configs that leave a size unset, and the value that lets the model be built.
CONFIG_FIXES = {
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "esm": {"vocab_size": 33},
    "hunyuan_v1_dense": {"head_dim": 128},
    "hunyuan_v1_moe": {"head_dim": 128},
    "ministral": {"head_dim": 128},
    "nemotron": {"num_key_value_heads": 8},
}


def head_modules(model: torch.nn.Module) -> list[str]:
    """The modules that own the parameters outside the model's base model, in model order."""
    prefix = model.base_model_prefix + "."
    owners = [name.rpartition(".")[0] for name, _ in model.named_parameters() if not name.startswith(prefix)]
    return list(dict.fromkeys(owners))


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for model_type, class_name in sorted(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.items()):
        try:
            with torch.device("meta"):
                model = getattr(transformers, class_name)(CONFIG_MAPPING[model_type](**CONFIG_FIXES.get(model_type, {})))
        except Exception as err:  # noqa: BLE001 - report every architecture that cannot be built, and go on
            print(f"{model_type}: not built from its default config ({type(err).__name__}: {str(err)[:80]})")
            continue
        heads = head_modules(model)
        if len(heads) > 1 or any(h not in ("classifier", "score") for h in heads):
            print(f"{model_type}: {', '.join(heads) or '(inside the base model)'}")


if __name__ == "__main__":
    main()
