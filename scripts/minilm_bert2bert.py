"""Write an encoder-decoder model warm-started from MiniLM on both sides (a "BERT2BERT"), for the
offline seq2seq recipe: the one pretrained model on this machine is an encoder, and LoRA needs a
pretrained base.

    python scripts/minilm_bert2bert.py models/minilm-bert2bert

The encoder is MiniLM; the decoder is MiniLM's first `--decoder-layers` layers (2 by default),
run causally, with a cross-attention block in each layer and an LM head whose output layer is its
(tied) word embeddings. The directory holds only weights a pretrained checkpoint could hold, under
the encoder-decoder's names: MiniLM's, and each cross-attention block as a copy of its layer's
pretrained self-attention (the number-words recipe trains those copies in full). The LM head's
transform is absent, so lorafit finds it "not in checkpoint", trains it in full and saves it with
the adapter; the head's output bias is saved, as zeros. With `--cross-attention random` the
cross-attention blocks are left out too, and lorafit trains them in full from a random start: on
the number-words recipe that start did not learn in 300 steps, where the copies reach validation
BLEU 93 at step 200 and 97 at 300 (see the README).
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file
from transformers import EncoderDecoderModel, GenerationConfig

from lorafit.models import load_tokenizer, resolve_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--model", default=MINILM, help="a BERT-style encoder (hub id, directory or bundled copy)")
    parser.add_argument("--decoder-layers", type=int, default=2,
                        help="the decoder keeps this many of MiniLM's 6 layers, the first ones (a cheaper decoder "
                             "for CPUs; the encoder keeps all)")
    parser.add_argument("--cross-attention", choices=("self", "random"), default="self",
                        help="self: each decoder layer's cross-attention is saved as a copy of its pretrained "
                             "self-attention; random: left out of the checkpoint (lorafit then trains it in full "
                             "from its random initialization)")
    args = parser.parse_args()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(source.path, source.path,
                                                                decoder_num_hidden_layers=args.decoder_layers)
    config = model.config
    config.decoder_start_token_id = tokenizer.cls_token_id
    config.eos_token_id = tokenizer.sep_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.vocab_size = config.decoder.vocab_size
    config.decoder.tie_word_embeddings = True
    model.generation_config = GenerationConfig.from_model_config(config)  # generate starts from [CLS], ends at [SEP]
    pretrained = load_file(f"{source.path}/model.safetensors")
    names = {name.removeprefix("bert.") for name in pretrained}  # some BERT checkpoints prefix "bert."
    kept = {name: tensor for name, tensor in model.state_dict().items()
            if name.removeprefix("encoder.") in names or name.removeprefix("decoder.bert.") in names}
    if args.cross_attention == "self":
        # A cross-attention block has the self-attention block's shape: a copy gives the decoder
        # pretrained projections to look at the source with, where random ones give it none.
        state = model.state_dict()
        for name in list(state):
            if ".crossattention." in name:
                kept[name] = state[name.replace(".crossattention.", ".attention.")].clone()
    # The LM head's output bias, saved as zeros (no bias): the head module that holds it also holds
    # the tied word embeddings, which would otherwise count as missing with it and train in full.
    bias = model.decoder.cls.predictions.bias
    torch.nn.init.zeros_(bias)
    kept["decoder.cls.predictions.bias"] = bias.detach()
    # Left out, by kind: "crossattention" for every layer's block, the LM head's parameters by name.
    left_out = sorted({"crossattention" if ".crossattention." in n else n for n, _ in model.named_parameters()
                       if n not in kept})
    note = f"{args.out}: {len(kept)} tensors from {source.name}; not in the checkpoint: {', '.join(left_out)}"
    model.save_pretrained(args.out, state_dict=kept)
    tokenizer.save_pretrained(args.out)
    print(note)


if __name__ == "__main__":
    main()
