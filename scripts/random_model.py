"""Write a model directory with a base model's architecture and tokenizer but random weights.

Throughput depends on shapes, not on weight values, so a random copy stands in for a checkpoint
that cannot travel (the GPU benchmark machine gets 64 MiB of files and no hub access):

    python scripts/random_model.py sentence-transformers/all-MiniLM-L6-v2 OUT --config-only   # here
    python scripts/random_model.py OUT OUT [--causal-lm]                                      # there

--config-only writes just config.json and the tokenizer files (a few MB); without it the
directory also gets random fp32 weights that `from_pretrained` (and so `lorafit train`) loads.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lorafit.models import load_tokenizer, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="hub id or directory (a bundled offline copy works too)")
    parser.add_argument("out")
    parser.add_argument("--config-only", action="store_true")
    parser.add_argument("--causal-lm", action="store_true",
                        help="build a ...ForCausalLM (default: only when config.architectures names one)")
    args = parser.parse_args()
    source = resolve_model(args.model)
    config = AutoConfig.from_pretrained(source.path, **source.kwargs)
    load_tokenizer(source).save_pretrained(args.out)
    config.save_pretrained(args.out)
    if args.config_only:
        return
    torch.manual_seed(0)
    causal = args.causal_lm or any(a.endswith("ForCausalLM") for a in config.architectures or [])
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.save_pretrained(args.out)
    print(f"{args.out}: random {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
