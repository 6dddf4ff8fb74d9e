"""The unpadded BERT encoder computes what the padded one does for every real token."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from lorafit.fast import use_fast_attention_dropout
from lorafit.lora import add_lora
from lorafit.unpad import use_unpadded_encoder


def classifier(attn: str = "sdpa"):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    config._attn_implementation = attn
    model = AutoModelForSequenceClassification.from_config(config)
    add_lora(model, 4, 8, ["query", "value"], dropout=0.0, modules_to_save=["classifier"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def padded_batch():
    lengths = [9, 3, 14, 5]
    ids = torch.randint(5, 20, (4, 14))
    mask = (torch.arange(14)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0 after each row's end; 45% of the grid is padding


@pytest.mark.parametrize("fast_attention", [False, True])
def test_unpadded_encoder_gives_the_same_logits_and_gradients(fast_attention):
    ids, mask = padded_batch()
    labels = torch.tensor([0, 2, 1, 2])
    results = []
    for unpad in (False, True):
        model = classifier()
        if fast_attention:
            use_fast_attention_dropout(model)
        assert not unpad or use_unpadded_encoder(model)
        model.train()  # dropout is 0.0 in the tiny config except where set; keep the training path
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = model(input_ids=ids, attention_mask=mask)
        torch.nn.functional.cross_entropy(out.logits, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits, grads), (unpadded_logits, unpadded_grads) = results
    torch.testing.assert_close(unpadded_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == unpadded_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(unpadded_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_unpadded_encoder_zeroes_pad_positions_and_keeps_real_ones():
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("bert")).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert use_unpadded_encoder(model)
        unpadded = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(unpadded[real], padded[real], rtol=1e-5, atol=1e-5)
    assert unpadded[~real].abs().max() == 0


def test_batches_with_little_padding_take_the_padded_forward(monkeypatch):
    import lorafit.unpad as unpad

    model = classifier()
    assert use_unpadded_encoder(model)
    calls = []
    monkeypatch.setattr(unpad, "_unpadded_layer", lambda *a: calls.append(1) or a[1])
    ids = torch.randint(5, 20, (2, 10))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no padding at all
    assert calls == []


def test_other_models_keep_their_forward():
    from conftest import tiny_lm

    assert not use_unpadded_encoder(tiny_lm("llama"))
    assert not use_unpadded_encoder(tiny_lm("gpt2"))
    assert not use_unpadded_encoder(classifier(attn="eager"))
