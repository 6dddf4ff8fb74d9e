"""Unpadded BERT-family encoders: the token-wise work skips the padding.

In a padded batch every Linear, LayerNorm, activation and dropout of an encoder layer also runs
on the pad positions, whose outputs nothing reads. With random batches padded to their longest,
that is about 45% of the tokens of the newsgroups job. `use_unpadded_encoder` changes the
encoder's forward so that the hidden states are kept as (real tokens, hidden) rows: the layers'
own modules run on those rows, and attention runs one example at a time on its own rows, with no
padding mask (through the model's attention function: SDPA, or lorafit's dropout-aware SDPA).

It switches on only after a probe (`_encoder_mismatch`) has shown, on the encoder's own arguments
for a padded batch, that both forwards give the same real-token outputs and gradients.

For every real token the result is the same computation as the padded forward. Pad positions of
`last_hidden_state` come out as zeros instead of values nothing should read (the pooler and the
classification heads read real tokens only). Dropout draws its masks for the real tokens only,
so the random stream differs from a padded run.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lorafit.fast import (ROUNDING, SpeedUp, probe, probe_batch, probe_failed, probe_labels, probing,
                          trainable_parameters)

# Below this fraction of pad tokens in a batch, the padded forward is used: the gathers and
# scatters around attention would cost more than the skipped work saves.
MIN_PADDING = 0.1


def _plain_encoder_layer(layer: nn.Module) -> bool:
    """A BERT-style post-norm encoder layer: self-attention (query/key/value), its output block,
    intermediate and output, with no decoder, cross-attention or feed-forward chunking."""
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (all(isinstance(getattr(self_attention, n, None), nn.Module) for n in ("query", "key", "value"))
            and all(isinstance(m, nn.Module) for m in (getattr(attention, "output", None),
                                                        getattr(layer, "intermediate", None),
                                                        getattr(layer, "output", None)))
            and hasattr(self_attention, "num_attention_heads") and hasattr(self_attention, "scaling")
            and not getattr(layer, "is_decoder", False) and not getattr(layer, "add_cross_attention", False)
            and not getattr(layer, "chunk_size_feed_forward", 0)
            and getattr(self_attention, "position_embedding_type", "absolute") == "absolute")


def _attention_function(self_attention: nn.Module):
    name = self_attention.config._attn_implementation
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        return None  # the layer's own eager path is not replicated here
    return ALL_ATTENTION_FUNCTIONS[name]


def _unpadded_layer(layer: nn.Module, h: torch.Tensor, lengths: list[int], attention) -> torch.Tensor:
    """One encoder layer on (N, hidden) rows: example after example, `lengths` rows each."""
    sa = layer.attention.self
    heads, head_dim = sa.num_attention_heads, sa.attention_head_size
    dropout = sa.dropout.p if sa.training else 0.0

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # (L, hidden) -> (1, heads, L, head_dim)
        return x.view(1, -1, heads, head_dim).transpose(1, 2)

    q, k, v = sa.query(h), sa.key(h), sa.value(h)
    contexts = []
    # Attention one example at a time: every key is a real token, so no padding mask, and the
    # scores cost sum(L_i^2) instead of batch x longest^2.
    for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        if qi.shape[0] == 0:
            contexts.append(qi)
            continue
        out, _ = attention(sa, split_heads(qi), split_heads(ki), split_heads(vi), None, dropout=dropout,
                           scaling=sa.scaling)
        contexts.append(out.reshape(qi.shape[0], heads * head_dim))
    attended = layer.attention.output(torch.cat(contexts), h)
    return layer.output(layer.intermediate(attended), attended)


def _token_mask(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Which (batch, position) entries are real tokens, read off the encoder's (B, 1, T, T) boolean
    mask: in a bidirectional mask every query row is the key padding mask. None when the model
    passed no mask (no padding) or a mask of another kind."""
    if (attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
            or attention_mask.shape[0] != shape[0] or attention_mask.shape[-1] != shape[1]):
        return None
    return attention_mask[:, 0, 0, :]


def _unpadded_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                      **kwargs) -> BaseModelOutputWithPastAndCrossAttentions | None:
    """The encoder's output computed on real tokens only, or None where the padded forward must run:
    no padding mask it can read, less than `MIN_PADDING` padding, cross-attention, or arguments it
    does not know."""
    keep = _token_mask(attention_mask, hidden_states.shape[:2])
    attention = _attention_function(self.layer[0].attention.self)
    if (keep is None or args or kwargs.get("encoder_hidden_states") is not None or attention is None
            or keep.float().mean() > 1 - MIN_PADDING):
        return None
    batch, length, width = hidden_states.shape
    index = keep.reshape(-1).nonzero().squeeze(1)  # row-major: example 0's tokens, then example 1's, ...
    lengths = keep.sum(1).tolist()
    h = hidden_states.reshape(batch * length, width).index_select(0, index)
    for layer in self.layer:
        h = _unpadded_layer(layer, h, lengths, attention)
    out = h.new_zeros(batch * length, h.shape[-1]).index_copy(0, index, h).view(batch, length, -1)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def _encoder_forward(self, *args, **kwargs):
    out = _unpadded_forward(self, *args, **kwargs)
    return out if out is not None else self._lorafit_padded_forward(*args, **kwargs)


def _encoder_mismatch(model: nn.Module, encoder: nn.Module) -> str | None:
    """Why the unpadded forward cannot stand in for `encoder`'s own, or None when it can: a probe batch
    with padding runs through the model (dropout off) to get the encoder's real arguments; on those,
    both forwards must give the real tokens' outputs, and the gradients of the encoder's input and
    of its LoRA factors, to within fp32 rounding (attention over padded rows and over rows of real
    tokens sums in another order)."""
    calls = []
    hook = encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)),
                                             with_kwargs=True)
    try:
        ids, mask = probe_batch(model)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **probe_labels(model, ids))
    except Exception as error:  # a model this probe cannot drive keeps its encoder
        return probe_failed(error)
    finally:
        hook.remove()
    if not calls:
        return "the model's forward does not call its encoder"
    args, kwargs = calls[0]
    hidden_states = args[0] if args else kwargs.pop("hidden_states")
    args, keep = args[1:], mask.bool()
    try:
        with torch.no_grad():
            if _unpadded_forward(encoder, hidden_states, *args, **kwargs) is None:
                return "its encoder is not called with a boolean padding mask alone"
        difference = probe(lambda h: encoder(h, *args, **kwargs)[0][keep],
                           lambda h: _unpadded_forward(encoder, h, *args, **kwargs)[0][keep],
                           [hidden_states], trainable_parameters(encoder))
    except Exception as error:
        return probe_failed(error)
    return None if difference <= ROUNDING else f"probe differs by {difference:.0e}"


def use_unpadded_encoder(model: nn.Module) -> SpeedUp:
    """Switch a BERT-family model (BERT, MiniLM, RoBERTa, ...) to the unpadded encoder forward where
    its layers have the plain structure and `_encoder_mismatch` finds nothing. Models using gradient
    checkpointing keep their forward."""
    speed_up = SpeedUp("unpadded encoder")
    for name, module in model.named_modules():
        encoder = getattr(module, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if (isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(_plain_encoder_layer(x) for x in layers)
                and _attention_function(layers[0].attention.self) is not None
                and not getattr(module, "is_gradient_checkpointing", False)
                and not getattr(module.config, "is_decoder", False)):
            where = f"{name}.encoder" if name else "encoder"
            with probing(model):
                mismatch = _encoder_mismatch(model, encoder)
            if mismatch:
                speed_up.declined[where] = mismatch
            else:
                encoder._lorafit_padded_forward = encoder.forward
                encoder.forward = types.MethodType(_encoder_forward, encoder)
                speed_up.patched.append(where)
            return speed_up
    return speed_up
