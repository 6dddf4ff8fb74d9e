"""Write a model directory with a base model's architecture and tokenizer but random weights.

Throughput depends on shapes, not on weight values, so a random copy stands in for a checkpoint
that cannot travel (the GPU benchmark machine gets 64 MiB of files and no hub access) or that has
no offline copy here:

    python scripts/random_model.py sentence-transformers/all-MiniLM-L6-v2 OUT --config-only   # here
    python scripts/random_model.py OUT OUT [--causal-lm]                                      # there
    python scripts/random_model.py Helsinki-NLP/opus-mt-en-de OUT                              # no hub needed

--config-only writes just config.json and the tokenizer files (a few MB); without it the
directory also gets random fp32 weights that `from_pretrained` (and so `lorafit train`) loads.

Models in STAND_INS are never looked up: their config is written out below, and an offline
tokenizer stands in for theirs. Helsinki-NLP/opus-mt-en-de (Marian, 74M parameters) has the
shapes of the hub's config.json (https://huggingface.co/Helsinki-NLP/opus-mt-en-de/blob/main/config.json:
d_model 512, 6 encoder and 6 decoder layers, 8 heads, ffn 2048, swish, sinusoidal positions, a
58,101-token vocabulary shared by the encoder, the decoder and the tied LM head). Its own
tokenizer is a sentencepiece model on the hub, so MiniLM's bundled WordPiece tokenizer (English,
30,522 tokens) stands in. The model keeps the full 58,101-row embedding and LM head, so the
compute is Marian's; the tokenizer only ever produces ids below 30,522. Pad and decoder start are
WordPiece's [PAD], end of sequence its [SEP]. Token counts per sentence differ somewhat from
Marian's sentencepiece, so tokens/s on this copy compare contenders, not tokenizers.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from lorafit.models import load_tokenizer, resolve_model

# hub id -> (its config.json's shape keys, written out by hand; the model whose tokenizer stands in)
STAND_INS = {
    "Helsinki-NLP/opus-mt-en-de": ({
        "model_type": "marian", "architectures": ["MarianMTModel"], "d_model": 512,
        "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
        "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "activation_function": "swish",
        "vocab_size": 58101, "decoder_vocab_size": 58101, "share_encoder_decoder_embeddings": True,
        "max_position_embeddings": 512, "scale_embedding": True, "dropout": 0.1, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "init_std": 0.02,
    }, "sentence-transformers/all-MiniLM-L6-v2"),
}


def stand_in_config(name: str, tokenizer) -> PretrainedConfig:
    """The written-out config of `name`, its special tokens taken from the stand-in tokenizer."""
    shapes, _ = STAND_INS[name]
    pad, eos = tokenizer.pad_token_id, tokenizer.sep_token_id or tokenizer.eos_token_id
    return AutoConfig.for_model(**shapes, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=eos,
                                forced_eos_token_id=eos, bos_token_id=None)


def model_class(config: PretrainedConfig, causal_lm: bool):
    """What a pretrained checkpoint of this architecture holds: a causal or seq2seq LM (the LM head
    is part of the base model there), else the bare body (no task head)."""
    if causal_lm or any(a.endswith("ForCausalLM") for a in config.architectures or []):
        return AutoModelForCausalLM
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModel


def write_random_model(name: str, out: str, config_only: bool = False, causal_lm: bool = False) -> str:
    """Write `name`'s config and tokenizer to `out`, and (unless `config_only`) random fp32 weights
    drawn with seed 0. Returns a one-line description."""
    if name in STAND_INS:
        tokenizer = load_tokenizer(resolve_model(STAND_INS[name][1]))
        # Marian reads no token_type_ids; the saved tokenizer should not make them.
        tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names = ["input_ids", "attention_mask"]
        config = stand_in_config(name, tokenizer)
    else:
        source = resolve_model(name)
        tokenizer = load_tokenizer(source)
        config = AutoConfig.from_pretrained(source.path, **source.kwargs)
    tokenizer.save_pretrained(out)
    config.save_pretrained(out)
    if config_only:
        return f"{out}: config and tokenizer of {name}"
    torch.manual_seed(0)
    model = model_class(config, causal_lm).from_config(config)
    model.save_pretrained(out)
    return f"{out}: random {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="hub id or directory (a bundled offline copy works too)")
    parser.add_argument("out")
    parser.add_argument("--config-only", action="store_true")
    parser.add_argument("--causal-lm", action="store_true",
                        help="build a ...ForCausalLM (default: only when config.architectures names one)")
    args = parser.parse_args()
    print(write_random_model(args.model, args.out, args.config_only, args.causal_lm))


if __name__ == "__main__":
    main()
