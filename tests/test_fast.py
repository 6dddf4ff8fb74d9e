"""The training speed-ups keep the math: dropout statistics and gradients, bit-identical bf16 storage,
the base-dropout override, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tokenizer, read_metrics, tiny_lm, toy_recipe
from rich.console import Console
from torch import nn

from lorafit.fast import FastDropout, drop_mask, store_frozen_weights, use_fast_dropout
from lorafit.lora import add_lora, lora_layers
from lorafit.models import ModelSource, load_model
from lorafit.recipe import recipe_from_dict
from lorafit.train import train


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_drop_mask_drops_at_rate_p(p):
    torch.manual_seed(0)
    drop = drop_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))
    assert drop.shape == (1000, 1001) and drop.dtype == torch.bool
    # 1M draws: the standard error of the rate is below 5e-4.
    assert abs(drop.float().mean().item() - p) < 2.5e-3
    # Rows are not copies of each other (every 15-bit piece is a fresh draw).
    assert not torch.equal(drop[0], drop[1])


def test_fast_dropout_scales_kept_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(64, 300, requires_grad=True)
    drop = FastDropout(0.25).train()
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)
    # Seeded like any torch randomness; identity in eval mode.
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(a, drop(x))
    assert drop.eval()(x) is x


def test_use_fast_dropout_swaps_only_active_plain_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.0), nn.Dropout(0.2)))
    assert use_fast_dropout(model) == 2
    assert type(model[1]) is FastDropout and model[1].p == 0.1
    assert type(model[2][0]) is nn.Dropout and type(model[2][1]) is FastDropout and model[2][1].p == 0.2


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_bf16_frozen_weights_give_identical_logits(kind, tiny_models):
    model, _ = load_model(ModelSource(kind, str(tiny_models[kind])), "sequence-classification", make_tokenizer(),
                          ["a", "b", "c"])
    add_lora(model, 4, 8, "all-linear", modules_to_save=["classifier" if kind == "bert" else "score"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)  # a non-zero update, so the LoRA branch counts
    model.eval()
    ids = torch.tensor([[2, 5, 7, 9, 11, 6], [2, 8, 10, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids, attention_mask=mask).logits
    changed = store_frozen_weights(model, torch.bfloat16)
    assert changed > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    # What trains stays fp32, and so do embeddings and norms.
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm)))


def test_bf16_frozen_weights_leave_tied_head_alone():
    model = tiny_lm("gpt2")  # lm_head shares its weight with the token embedding
    add_lora(model, 4, 8, ["c_attn"])  # freezes the base model
    store_frozen_weights(model, torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.float32
    assert model.transformer.h[0].attn.c_attn.base.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_attn.lora_A.weight.dtype == torch.float32


def test_model_dropout_override(tiny_models):
    source = ModelSource("bert", str(tiny_models["bert"]))
    kept, _ = load_model(source, "sequence-classification", make_tokenizer(), ["a", "b", "c"])
    assert kept.config.hidden_dropout_prob == 0.1 and kept.config.attention_probs_dropout_prob == 0.1
    off, _ = load_model(source, "sequence-classification", make_tokenizer(), ["a", "b", "c"], dropout=0.0)
    assert off.config.hidden_dropout_prob == 0.0 and off.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, nn.Dropout))
    # Training-mode outputs are deterministic once every dropout is off.
    off.train()
    ids = torch.tensor([[2, 5, 7, 9]])
    assert torch.equal(off(input_ids=ids).logits, off(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_attention_dropout_set_apart_from_hidden_dropout(tiny_models, arch):
    source = ModelSource(arch, str(tiny_models[arch]))
    model, _ = load_model(source, "sequence-classification", make_tokenizer(), ["a", "b", "c"], dropout=0.2,
                          attention_dropout=0.0)
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    if arch == "bert":
        assert model.config.hidden_dropout_prob == 0.2 and model.config.attention_probs_dropout_prob == 0.0
        attention = {n for n in rates if n.endswith("attention.self.dropout")}
    else:
        assert model.config.resid_pdrop == 0.2 and model.config.embd_pdrop == 0.2 and model.config.attn_pdrop == 0.0
        attention = {n for n in rates if n.endswith("attn.attn_dropout")}
    assert len(attention) == 2  # one per layer of the tiny model
    assert {n: p for n, p in rates.items() if n in attention} == dict.fromkeys(attention, 0.0)
    others = {n: p for n, p in rates.items() if n not in attention}
    assert len(others) > 2 and set(others.values()) == {0.2}


def tiny_llama_with_lora():
    """A tiny Llama with rank-4 LoRA on every Linear, B non-zero so that every LoRA weight gets a gradient."""
    model = tiny_lm("llama")
    add_lora(model, 4, 8, "all-linear")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return model


def test_gradient_checkpointing_recomputes_every_layer_and_keeps_the_losses(tiny_models, toy_data, tmp_path,
                                                                           monkeypatch):
    """train.gradient_checkpointing through `train`: each decoder layer's attention runs again in the
    backward (counted with gradients on, so evaluation does not count; the layer's own forward is
    where transformers puts the checkpoint, so it is left as it is), and the losses are those of the
    run without it, with the fused MLP, RMSNorm and shared copy on under bf16."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    forward, calls = LlamaAttention.forward, []

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaAttention, "forward", counted)
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        out = tmp_path / f"checkpointing-{checkpointing}"
        raw = toy_recipe(tiny_models["llama"], toy_data, out, train={
            "max_steps": 4, "log_every": 1, "precision": "bf16", "gradient_checkpointing": checkpointing})
        train(recipe_from_dict(raw), console=Console(quiet=True))
        runs[checkpointing] = [m["loss"] for m in read_metrics(out) if "split" not in m], sum(calls)
    (losses, forwards), (checkpointed_losses, checkpointed_forwards) = runs[False], runs[True]
    assert forwards == 4 * 2  # 4 steps x 2 layers
    assert checkpointed_forwards == 2 * forwards  # and each again in the backward
    assert len(losses) == 4
    assert checkpointed_losses == pytest.approx(losses, rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_head_cross_entropy_matches_the_plain_loss(precision):
    from lorafit.fast import head_cross_entropy

    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).requires_grad_(False)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        plain = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain * 0.5, hidden)
    with autocast:
        chunked = head_cross_entropy(hidden, head, targets, chunk=4)  # 3 chunks, the last one short
    (chunked_grad,) = torch.autograd.grad(chunked * 0.5, hidden)
    tol = {"rtol": 1e-5, "atol": 1e-5} if precision == "fp32" else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(chunked, plain, **tol)
    torch.testing.assert_close(chunked_grad, plain_grad, **tol)
    if precision == "bf16":  # same logits bits: the loss differs only by summation order
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    with torch.no_grad(), autocast:  # evaluation: the same loss, no gradient formed
        torch.testing.assert_close(head_cross_entropy(hidden, head, targets, chunk=4), chunked.detach())


@pytest.mark.parametrize("transform", [{"scale": 4.0}, {"divisor": 0.25}, {"softcap": 1.5}], ids=str)
@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_head_cross_entropy_applies_the_models_logit_transform(transform, trainable_head):
    """Loss and gradient of CE(transform(head(hidden))), chunked, against autograd through the
    transform written as the models write it (Cohere, Granite, Gemma 2); a trainable head takes
    the plain path, with the same transform."""
    from lorafit.fast import LogitTransform, head_cross_entropy

    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).requires_grad_(trainable_head)
    with torch.no_grad():
        head.weight.mul_(8)  # logits of a few units, where the soft cap bends them
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    logits = head(hidden)
    if "scale" in transform:
        logits = logits * transform["scale"]
    elif "divisor" in transform:
        logits = logits / transform["divisor"]
    else:
        logits = torch.tanh(logits / transform["softcap"]) * transform["softcap"]
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain * 0.5, hidden)
    chunked = head_cross_entropy(hidden, head, targets, chunk=4, transform=LogitTransform(**transform))
    (chunked_grad,) = torch.autograd.grad(chunked * 0.5, hidden)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-5, atol=1e-5)
    untransformed = head_cross_entropy(hidden, head, targets, chunk=4)
    assert abs(untransformed.item() - plain.item()) > 1.0  # the transform matters here


@pytest.mark.parametrize("masking", ["padding", "causal"])
def test_attention_dropout_uses_the_recorded_mask(masking, monkeypatch):
    import lorafit.fast as fast

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    module = nn.Module()
    module.is_causal = masking == "causal"
    attend = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    attend[1, :, :, 3:] = False  # the second sequence has 2 padding positions
    mask = attend if masking == "padding" else None
    seen = []
    real_drop_mask = fast.drop_mask
    monkeypatch.setattr(fast, "drop_mask", lambda *a: seen.append(real_drop_mask(*a)) or seen[-1])
    out, _ = fast.sdpa_fast_dropout(module, q, k, v, mask, dropout=0.3, scaling=0.5)

    scores = q @ k.transpose(-1, -2) * 0.5
    allowed = attend if masking == "padding" else torch.ones(5, 5, dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = (probs * ~seen[0] / 0.7) @ v
    assert len(seen) == 1 and 0 < seen[0].float().mean() < 0.6
    torch.testing.assert_close(out, expected.transpose(1, 2))
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    # Without dropout it is transformers' SDPA itself.
    plain, _ = fast.sdpa_fast_dropout(module, q, k, v, mask, dropout=0.0, scaling=0.5)
    torch.testing.assert_close(plain, (probs @ v).transpose(1, 2))


def keep_everything(model: nn.Module) -> None:
    """Switch `model` to SDPA with its output scaled by 1/(1 - p): what an attention dropout that drops
    nothing computes, and so what `sdpa_fast_dropout` must give with its masks forced empty."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out / (1 - dropout), None

    ALL_ATTENTION_FUNCTIONS.register("keep_everything", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("keep_everything", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("keep_everything")


def empty_masks(monkeypatch) -> list[float]:
    """Force `fast.drop_mask` to drop nothing; returns the list of the rates it is called with."""
    import lorafit.fast as fast

    rates = []
    monkeypatch.setattr(fast, "drop_mask", lambda shape, p, device: rates.append(p) or torch.zeros(
        shape, dtype=torch.bool, device=device))
    return rates


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_fast_attention_dropout_is_what_runs_and_equals_sdpa_with_nothing_dropped(kind, tiny_models, monkeypatch):
    """Hidden dropout off, attention dropout 0.1. In training every attention call goes through
    lorafit's function and draws one mask per layer at the model's rate; with those masks forced
    empty, logits and LoRA gradients are SDPA's with its output scaled by 1/(1 - p), which is what a
    dropout that keeps everything computes. Real masks drop at rate p and repeat under one seed."""
    import lorafit.fast as fast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, _ = load_model(ModelSource(kind, str(tiny_models[kind])), "sequence-classification", make_tokenizer(),
                          ["a", "b", "c"], dropout=0.0, attention_dropout=0.1)
    add_lora(model, 4, 8, "all-linear", modules_to_save=["classifier" if kind == "bert" else "score"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    reference = copy.deepcopy(model)
    speed_up = fast.use_fast_attention_dropout(model)
    assert speed_up.note() == "fast attention dropout" and len(speed_up.patched) == 2
    assert ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation] is fast.sdpa_fast_dropout
    keep_everything(reference)

    ids = torch.tensor([[2, 5, 7, 9, 11, 6], [2, 8, 10, 3, 0, 0]])
    cotangent = torch.randn(2, 3)

    def run(m):
        m.train()
        logits = m(input_ids=ids, attention_mask=(ids != 0).long()).logits
        (logits * cotangent).sum().backward()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    real_drop_mask = fast.drop_mask
    rates = empty_masks(monkeypatch)
    logits, grads = run(reference)
    assert rates == []
    fast_logits, fast_grads = run(model)
    assert rates == [0.1, 0.1]  # one mask per layer: the fast path ran
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-6)

    masks = []
    monkeypatch.setattr(fast, "drop_mask", lambda *args: masks.append(real_drop_mask(*args)) or masks[-1])
    many = torch.randint(5, 20, (8, 32))
    torch.manual_seed(0)
    dropped = model(input_ids=many).logits
    torch.manual_seed(0)
    assert torch.equal(model(input_ids=many).logits, dropped)
    assert len(masks) == 4 and masks[0].shape == (8, 2, 32, 32)
    # 2 x 8 x 2 x 32 x 32 draws: the standard error of the rate is below 2e-3 (bidirectional for BERT,
    # and a causal model's masked-out scores are dropped at the same rate).
    assert abs(torch.cat([m.flatten() for m in masks[:2]]).float().mean().item() - 0.1) < 0.01
    assert not torch.equal(model.eval()(input_ids=many).logits, dropped)


ENCODER_DECODER_CALLS = ["model.encoder.layers.0.self_attn", "model.decoder.layers.0.self_attn",
                         "model.decoder.layers.0.encoder_attn"]


@pytest.mark.parametrize("kind", ["bart", "marian", "t5"])
def test_fast_attention_dropout_probes_seq2seq_lms_and_equals_sdpa_with_nothing_dropped(kind, monkeypatch):
    """Tiny seq2seq LMs, attention dropout 0.1. T5's and Marian's forwards make decoder inputs from labels
    only, so the probe gives the decoder its own. BART's and Marian's encoder, decoder and cross-attention
    calls prove themselves and switch on; in training, with the masks forced empty, the loss and LoRA
    gradients are SDPA's scaled as a dropout that keeps everything scales them, and real masks repeat
    under one seed. T5 passes its relative position bias, which `dropout_attention` does not add (or,
    in older transformers, does not call the attention functions at all): it keeps SDPA."""
    import lorafit.fast as fast
    from test_seq2seq import random_batch, tiny_config
    from transformers import AutoModelForSeq2SeqLM

    config = tiny_config(kind)
    if kind == "t5":
        config.dropout_rate = 0.1  # T5's one rate, on its attention probabilities too
    else:
        config.dropout, config.attention_dropout = 0.0, 0.1
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    add_lora(model, 4, 8, "all-linear")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    reference = copy.deepcopy(model)
    speed_up = fast.use_fast_attention_dropout(model)
    if kind == "t5":  # transformers before T5 moved onto the attention functions: another reason, still off
        assert speed_up.note() in ("fast attention dropout: off for encoder.block.0.layer.0.SelfAttention and 2 more "
                                   "(attention passes position_bias)",
                                   "fast attention dropout: off for the model (its attention does not call "
                                   "transformers' attention functions)")
        assert speed_up.patched == [] and model.config._attn_implementation == "sdpa"
        return
    assert speed_up.note() == "fast attention dropout" and speed_up.patched == ENCODER_DECODER_CALLS
    keep_everything(reference)
    batch = random_batch()

    def run(m):
        m.train()
        loss = m(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    rates = empty_masks(monkeypatch)
    loss, grads = run(reference)
    assert rates == []
    fast_loss, fast_grads = run(model)
    assert rates == [0.1, 0.1, 0.1]  # one mask per attention call: the fast path ran
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-6)

    monkeypatch.undo()
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = model(**batch).loss
        torch.manual_seed(0)
        assert torch.equal(model(**batch).loss, dropped)
        assert not torch.equal(model.eval()(**batch).loss, dropped)


def test_silu_mul_matches_autograd_in_value_and_gradient():
    from lorafit.fast import silu_mul

    gate = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(silu_mul, (gate, up))
    out = silu_mul(gate, up)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)


def test_fused_gated_mlp_leaves_other_mlps_alone():
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_config
    from lorafit.fast import use_fused_gated_mlp

    assert use_fused_gated_mlp(tiny_lm("gpt2")).note() is None
    assert use_fused_gated_mlp(AutoModelForSequenceClassification.from_config(tiny_config("bert"))).note() is None


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_lora_layers_reading_one_input_share_its_autocast_copy(kind):
    """Under bf16 autocast, LoRA layers without dropout that read the same tensor (q, k and v) keep
    one bf16 copy of it for the backward once switched on, and compute exactly what they computed
    before."""
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_config
    from lorafit.lora import use_shared_autocast_copy

    def run(shared: bool):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(tiny_config(kind)) if kind == "bert" else tiny_lm(kind)
        add_lora(model, 4, 8, "all-linear")
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1)
        if shared:
            speed_up = use_shared_autocast_copy(model, torch.bfloat16)
            assert speed_up.note() == "shared autocast copy" and len(speed_up.patched) == len(lora_layers(model))
        model.train()
        ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 7, 7, 5, 9, 3, 6, 6]])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if kind == "bert":
                    loss = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
                else:
                    loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        activations = sum(n for ptr, n in storages.items() if ptr not in params)
        return loss.detach(), activations, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, saved, grads = run(False)
    shared_loss, shared_saved, shared_grads = run(True)
    assert torch.equal(loss, shared_loss)
    if kind == "gpt2":  # one fused c_attn: nothing else reads its input
        assert shared_saved <= saved
    else:  # q/k/v (and gate/up) read one tensor each
        assert shared_saved < saved
    assert grads.keys() == shared_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], rtol=0, atol=0)


def test_fused_rms_norm_gives_the_autocast_bits_forward_and_a_close_backward():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorafit.fast import _RMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    nn.init.normal_(norm.weight, 1.0, 0.5)
    norm.weight.requires_grad_(False)
    x = (3 * torch.randn(4, 9, 48)).requires_grad_()
    probe = torch.randn(4, 9, 48)
    # Reference: the module's own forward, cast to bf16 as a Linear under autocast would.
    expected = norm(x).to(torch.bfloat16)
    (expected.float() * probe).sum().backward()
    expected_grad, x.grad = x.grad, None
    got = _RMSNorm.apply(x, norm.weight, norm.variance_epsilon, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    (got.float() * probe).sum().backward()
    # The backward sees x/rms(x) through the bf16 output: within bf16 precision of the exact gradient.
    torch.testing.assert_close(x.grad, expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item())
    assert not torch.equal(x.grad, torch.zeros_like(x.grad))


def test_fused_rms_norm_in_a_model_keeps_the_loss_and_saves_less():
    from lorafit.fast import use_fused_rms_norm

    def run(fused: bool):
        model = tiny_llama_with_lora()
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                nn.init.normal_(module.weight, 1.0, 0.3)  # not all ones, so a mix-up would show
        store_frozen_weights(model, torch.bfloat16)
        patched = len(use_fused_rms_norm(model).patched) if fused else 0
        model.train()
        ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 7, 7, 5, 9, 3, 0, 0]])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation: the model's own norm
            eval_logits = model(input_ids=ids).logits
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return patched, loss.detach(), sum(saved), grads, eval_logits

    _, loss, saved, grads, logits = run(False)
    patched, fused_loss, fused_saved, fused_grads, fused_logits = run(True)
    assert patched == 2 * 2 + 1  # two per layer, and the final norm
    assert torch.equal(loss, fused_loss)  # the Linears get the same bf16 inputs
    assert torch.equal(logits, fused_logits)
    assert fused_saved < saved
    for name in grads:
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=3e-2, atol=3e-2 * scale)


def test_fused_rms_norm_leaves_other_models_and_zero_weights_alone():
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_config
    from lorafit.fast import use_fused_rms_norm

    assert use_fused_rms_norm(tiny_lm("gpt2")).note() is None
    assert use_fused_rms_norm(AutoModelForSequenceClassification.from_config(tiny_config("bert"))).note() is None
    model = tiny_lm("llama")
    model.requires_grad_(False)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 0.0  # the backward divides by the weight
    assert use_fused_rms_norm(model).note() == ("fused RMSNorm: on 4 of 5, off for model.layers.0.input_layernorm "
                                                "(its weight has zeros)")
    model = tiny_lm("llama")  # weights that train keep the model's own norm
    assert use_fused_rms_norm(model).note() == "fused RMSNorm: off for model.norm and 4 more (its weight trains)"


def test_onednn_caches_are_bounded_unless_the_environment_says_otherwise(monkeypatch):
    import os

    from lorafit.onednn import ONEDNN_CACHE_CAPACITY, bound_onednn_caches

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # the user's own setting stays
    bound_onednn_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
