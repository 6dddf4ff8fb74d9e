"""The unpadded BERT encoder computes what the padded one does for every real token."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import read_metrics, tiny_config, toy_recipe
from rich.console import Console

from lorafit.fast import SpeedUp, use_fast_attention_dropout
from lorafit.lora import add_lora
from lorafit.recipe import recipe_from_dict
from lorafit.train import train
from lorafit.unpad import use_unpadded_encoder


def classifier(attn: str = "sdpa", kind: str = "bert"):
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    torch.manual_seed(0)
    config = tiny_config("bert")
    if kind == "roberta":  # positions counted from the padding index, no token types
        config = RobertaConfig(**{k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "pad_token_id")}, type_vocab_size=1)
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


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("fast_attention", [False, True])
def test_unpadded_encoder_gives_the_same_logits_and_gradients(fast_attention, kind, monkeypatch):
    import lorafit.unpad as unpad

    ids, mask = padded_batch()
    labels = torch.tensor([0, 2, 1, 2])
    layers_run, unpadded_layer = [], unpad._unpadded_layer
    monkeypatch.setattr(unpad, "_unpadded_layer", lambda *args: layers_run.append(1) or unpadded_layer(*args))
    results = []
    for unpadded in (False, True):
        model = classifier(kind=kind)
        if fast_attention:  # attention dropout on, so that lorafit's attention function is switched on
            for layer in getattr(model, kind).encoder.layer:
                layer.attention.self.dropout.p = 0.1
            assert use_fast_attention_dropout(model).note() == "fast attention dropout"
        if unpadded:
            speed_up = use_unpadded_encoder(model)
            assert speed_up.patched == [f"{kind}.encoder"] and speed_up.note() == "unpadded encoder"
        layers_run.clear()
        model.train()
        for module in model.modules():  # dropout off, the training path kept
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = model(input_ids=ids, attention_mask=mask)
        torch.nn.functional.cross_entropy(out.logits, labels).backward()
        assert len(layers_run) == (2 if unpadded else 0)  # both layers of the tiny encoder ran unpadded
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits, grads), (unpadded_logits, unpadded_grads) = results
    torch.testing.assert_close(unpadded_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == unpadded_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(unpadded_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def bert2bert():
    """A tiny BERT encoder-decoder (what scripts/minilm_bert2bert.py builds from MiniLM), LoRA on its
    query/value projections with nonzero B, so that the factors get gradients."""
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    torch.manual_seed(0)
    encoder, decoder = tiny_config("bert"), tiny_config("bert")
    decoder.update({"is_decoder": True, "add_cross_attention": True})
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.update({"decoder_start_token_id": 1, "pad_token_id": 0})
    model = EncoderDecoderModel(config=config)
    add_lora(model, 4, 8, ["query", "value"], dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def test_unpadded_encoder_in_a_seq2seq_lm_keeps_its_loss_and_gradients(monkeypatch):
    """The probe drives an encoder-decoder as training does (labels make the decoder's inputs), so a
    BERT2BERT model's encoder runs unpadded, with the loss and gradients of its own forward."""
    import lorafit.unpad as unpad

    ids, mask = padded_batch()
    labels = torch.randint(5, 20, (4, 6))
    layers_run, unpadded_layer = [], unpad._unpadded_layer
    monkeypatch.setattr(unpad, "_unpadded_layer", lambda *args: layers_run.append(1) or unpadded_layer(*args))
    results = []
    for unpadded in (False, True):
        model = bert2bert()
        if unpadded:
            assert use_unpadded_encoder(model).patched == ["encoder.encoder"]
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        layers_run.clear()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert len(layers_run) == (2 if unpadded else 0)  # the encoder's layers; the decoder keeps its own
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (unpadded_loss, unpadded_grads) = results
    torch.testing.assert_close(unpadded_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == unpadded_grads.keys() and any("encoder.encoder" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(unpadded_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_unpadded_encoder_zeroes_pad_positions_and_keeps_real_ones():
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("bert")).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert use_unpadded_encoder(model).patched == ["encoder"]
        unpadded = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(unpadded[real], padded[real], rtol=1e-5, atol=1e-5)
    assert unpadded[~real].abs().max() == 0


def test_batches_with_little_padding_take_the_padded_forward(monkeypatch):
    import lorafit.unpad as unpad

    model = classifier()
    assert use_unpadded_encoder(model).patched == ["bert.encoder"]
    calls = []
    monkeypatch.setattr(unpad, "_unpadded_layer", lambda *a: calls.append(1) or a[1])
    ids = torch.randint(5, 20, (2, 10))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no padding at all
    assert calls == []


def test_other_models_keep_their_forward():
    from conftest import tiny_lm

    assert use_unpadded_encoder(tiny_lm("llama")).note() is None
    assert use_unpadded_encoder(tiny_lm("gpt2")).note() is None
    assert use_unpadded_encoder(classifier(attn="eager")).note() is None


def test_unpadded_encoder_runs_in_training_and_keeps_the_losses(tiny_models, toy_data, tmp_path, monkeypatch):
    """`train` on random batches (not grouped by length, so they carry padding): the unpadded encoder
    runs in every training step, and the losses are those of a run with it off (dropout off, fp32:
    only the order of sums differs)."""
    import lorafit.train as train_module
    import lorafit.unpad as unpad

    training_layers, unpadded_layer = [], unpad._unpadded_layer

    def counted(layer, *args):
        training_layers.append(layer.training)  # probes and evaluation run in eval mode
        return unpadded_layer(layer, *args)

    monkeypatch.setattr(unpad, "_unpadded_layer", counted)
    monkeypatch.setattr(unpad, "MIN_PADDING", 0.0)  # every batch unpadded, however little padding it has
    runs = {}
    for unpadded in (True, False):
        if not unpadded:
            monkeypatch.setattr(train_module, "use_unpadded_encoder", lambda model: SpeedUp("unpadded encoder"))
        training_layers.clear()
        out = tmp_path / f"unpadded-{unpadded}"
        raw = toy_recipe(tiny_models["bert"], toy_data, out, train={
            "max_steps": 6, "log_every": 1, "precision": "fp32", "group_by_length": False})
        log = io.StringIO()
        train(recipe_from_dict(raw), console=Console(file=log, width=200))
        device_line = next(line for line in log.getvalue().splitlines() if line.startswith("device"))
        runs[unpadded] = [m["loss"] for m in read_metrics(out) if "split" not in m], sum(training_layers), device_line
    losses, steps_layers, device_line = runs[True]
    padded_losses, padded_steps_layers, padded_device_line = runs[False]
    assert "unpadded encoder" in device_line and "unpadded encoder" not in padded_device_line
    assert steps_layers == 6 * 2 and padded_steps_layers == 0  # 6 steps x 2 layers
    assert len(losses) == 6
    assert losses == pytest.approx(padded_losses, rel=1e-5)
