"""Every patch of a model's code proves itself on a probe before it switches on: where the model's
own code computes something else, the patch stays off and the log says where and why."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import WORDS, tiny_config, tiny_lm, toy_recipe
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lorafit.fast import SpeedUp, use_fast_attention_dropout, use_fused_gated_mlp
from lorafit.lora import add_lora, lora_layers, use_shared_autocast_copy
from lorafit.recipe import recipe_from_dict
from lorafit.train import prepare_model
from lorafit.unpad import use_unpadded_encoder


def with_lora(model: nn.Module, targets: list[str] | str = "all-linear", saved: list[str] = ()) -> nn.Module:
    """`model` with rank-4 LoRA, lora_B non-zero so that every LoRA weight gets a gradient."""
    add_lora(model, 4, 8, targets, modules_to_save=list(saved))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return model


def decoder(kind: str, **config) -> nn.Module:
    """A tiny random causal LM: Llama as conftest's `tiny_lm`, or Qwen2 or Mistral of the same size;
    `config` changes its config."""
    from transformers import MistralConfig, Qwen2Config

    torch.manual_seed(0)
    base = tiny_config("llama")
    if kind != "llama":
        base = {"qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**{k: getattr(base, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "pad_token_id", "bos_token_id")})
    base.vocab_size, base.eos_token_id = len(WORDS) + 4, 3
    for key, value in config.items():
        setattr(base, key, value)
    return AutoModelForCausalLM.from_config(base).eval()


def test_speed_up_notes_say_what_switched_on_and_what_declined():
    assert SpeedUp("fused gated MLP").note() is None  # nothing it applies to
    assert SpeedUp("fused gated MLP", ["a.mlp", "b.mlp"]).note() == "fused gated MLP"
    declined = {"a.mlp": "probe differs by 3e-02", "b.mlp": "probe differs by 1e-01"}
    assert (SpeedUp("fused gated MLP", [], declined).note()
            == "fused gated MLP: off for a.mlp and 1 more (probe differs by 3e-02)")
    assert (SpeedUp("fused gated MLP", ["a.mlp"], {"b.mlp": "probe differs by 3e-02"}).note()
            == "fused gated MLP: on 1 of 2, off for b.mlp (probe differs by 3e-02)")
    assert (SpeedUp("fast attention dropout", [], {"": "probe failed with TypeError: boom"}).note()
            == "fast attention dropout: off for the model (probe failed with TypeError: boom)")


# ---------------------------------------------------------------- fused gated MLP


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_gated_mlp_switches_on_and_gives_the_same_loss_and_gradients_and_saves_less(kind, precision):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def run(fused: bool):
        model = with_lora(decoder(kind))
        speed_up = use_fused_gated_mlp(model, dtype) if fused else None
        model.train()
        ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 7, 7, 5, 9, 3, 0, 0]])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return speed_up, loss.detach(), sum(saved), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _, loss, saved, grads = run(False)
    speed_up, fused_loss, fused_saved, fused_grads = run(True)
    assert speed_up.patched == ["model.layers.0.mlp", "model.layers.1.mlp"] and speed_up.note() == "fused gated MLP"
    assert torch.equal(loss, fused_loss)
    assert fused_saved < saved
    assert grads.keys() == fused_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(fused_grads[name], grads[name]), name


class SiLU(nn.Module):
    """Named like the activation the fused MLP assumes, computing another one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x)


def test_fused_gated_mlp_declines_mlps_that_compute_something_else():
    model = with_lora(decoder("llama"))
    for layer in model.model.layers:
        layer.mlp.act_fn = SiLU()
    speed_up = use_fused_gated_mlp(model)
    assert speed_up.patched == []
    assert speed_up.note().startswith("fused gated MLP: off for model.layers.0.mlp and 1 more (probe differs by ")
    assert all("forward" not in vars(layer.mlp) for layer in model.model.layers)  # the model's own forward stays

    model = with_lora(decoder("llama"))
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x) * 0.5  # an MLP class of the same name, with another forward
    speed_up = use_fused_gated_mlp(model)
    assert speed_up.patched == ["model.layers.0.mlp"]
    assert speed_up.note() == "fused gated MLP: on 1 of 2, off for model.layers.1.mlp (probe differs by 1e+00)"


# ---------------------------------------------------------------- fast attention dropout


def test_fast_attention_dropout_declines_attention_it_does_not_compute():
    # Mistral passes its sliding window to the attention function, which dropout_attention does not apply.
    model = with_lora(decoder("mistral", attention_dropout=0.1))
    speed_up = use_fast_attention_dropout(model)
    assert speed_up.patched == [] and model.config._attn_implementation == "sdpa"
    assert speed_up.note() == ("fast attention dropout: off for model.layers.0.self_attn and 1 more "
                               "(attention passes sliding_window)")


def test_fast_attention_dropout_probes_encoder_decoder_classifiers():
    """BART's classifier reads the hidden state at each row's EOS token, so the probe batch ends its
    rows with one; its encoder, decoder and cross-attention calls are then probed and switched on."""
    from transformers import BartConfig

    torch.manual_seed(0)
    config = BartConfig(vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=4,
                        decoder_start_token_id=2, num_labels=3)
    model = with_lora(AutoModelForSequenceClassification.from_config(config), saved=["classification_head"])
    speed_up = use_fast_attention_dropout(model)
    assert speed_up.note() == "fast attention dropout"
    assert speed_up.patched == ["model.encoder.layers.0.self_attn", "model.decoder.layers.0.self_attn",
                                "model.decoder.layers.0.encoder_attn"]


def test_fast_attention_dropout_declines_when_sdpa_computes_something_else(monkeypatch):
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def hotter_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return sdpa(module, query, key, value, attention_mask, scaling=2 * (scaling or query.shape[-1] ** -0.5),
                    **kwargs)

    # As if transformers' SDPA (the model's own attention) did something dropout_attention does not.
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", hotter_sdpa)
    model = with_lora(decoder("llama", attention_dropout=0.1))
    speed_up = use_fast_attention_dropout(model)
    assert speed_up.patched == [] and model.config._attn_implementation == "sdpa"
    assert speed_up.note().startswith("fast attention dropout: off for model.layers.0.self_attn and 1 more "
                                      "(probe differs by ")


def test_fast_attention_dropout_stays_off_without_attention_dropout_or_sdpa():
    model = with_lora(decoder("llama"))  # attention_dropout 0.0: every call would go straight to SDPA
    speed_up = use_fast_attention_dropout(model)
    assert speed_up.note() is None and model.config._attn_implementation == "sdpa"
    config = tiny_config("bert")
    config._attn_implementation = "eager"
    eager = AutoModelForSequenceClassification.from_config(config)
    assert use_fast_attention_dropout(eager).note() is None and eager.config._attn_implementation == "eager"


def test_fast_attention_dropout_declines_attention_outside_transformers_functions():
    config = tiny_config("bert")
    config.attention_probs_dropout_prob = 0.1
    model = AutoModelForSequenceClassification.from_config(config)
    for layer in model.bert.encoder.layer:  # attention computed in the module itself, as older BERTs did
        attention = layer.attention.self

        def own_attention(hidden_states, attention_mask=None, attention=attention, **kwargs):
            split = hidden_states.shape[:-1] + (attention.num_attention_heads, -1)
            q, k, v = (f(hidden_states).view(split).transpose(1, 2) for f in (attention.query, attention.key,
                                                                                attention.value))
            out = nn.functional.scaled_dot_product_attention(q, k, v, attention_mask)
            return out.transpose(1, 2).reshape(hidden_states.shape), None

        attention.forward = own_attention
    speed_up = use_fast_attention_dropout(model)
    assert speed_up.note() == ("fast attention dropout: off for the model "
                               "(its attention does not call transformers' attention functions)")
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- unpadded encoder


def test_unpadded_encoder_declines_encoders_that_compute_something_else():
    from transformers import XmodConfig

    # X-MOD: BERT's module names, but a language adapter in each layer's output and its LayerNorm in
    # the attention block. Before the probe, its encoder was swapped and training crashed.
    torch.manual_seed(0)
    config = XmodConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=3,
                        languages=["en_XX", "de_DE"], default_language="en_XX")
    model = with_lora(AutoModelForSequenceClassification.from_config(config), ["query", "value"], ["classifier"])
    speed_up = use_unpadded_encoder(model)
    assert speed_up.note() == ("unpadded encoder: off for roberta.encoder (probe failed with TypeError: "
                               "XmodOutput.forward() missing 1 required positional argument: 'lang_ids')")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])
    model(input_ids=ids, attention_mask=(ids != 0).long())  # the model's own forward: it runs

    # A BERT whose second layer's attention is not what the unpadded layer computes.
    config = tiny_config("bert")
    config.num_labels = 3
    model = with_lora(AutoModelForSequenceClassification.from_config(config), ["query", "value"], ["classifier"])
    attention = model.bert.encoder.layer[1].attention
    attention.forward = lambda *args, **kwargs: (type(attention).forward(attention, *args, **kwargs)[0] * 0.5, None)
    speed_up = use_unpadded_encoder(model)
    assert speed_up.patched == [] and "forward" not in vars(model.bert.encoder)
    assert speed_up.note().startswith("unpadded encoder: off for bert.encoder (probe differs by ")


@pytest.mark.parametrize("model_type", ["esm", "xlm-roberta-xl", "roberta-prelayernorm"])
def test_unpadded_encoder_declines_pre_norm_encoders(model_type):
    """BERT's module names, but each layer normalizes before its attention (ESM also rotates q and k),
    which the unpadded layer does not: before the probe, ESM and XLM-RoBERTa-XL trained on padded
    batches with logits 0.025 off their own."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=3)
    model = with_lora(AutoModelForSequenceClassification.from_config(config), ["query", "value"])
    speed_up = use_unpadded_encoder(model)
    assert speed_up.patched == []
    assert speed_up.note().startswith(f"unpadded encoder: off for {model.base_model_prefix}.encoder (probe differs by ")


# ---------------------------------------------------------------- shared autocast copy


class NormalizedLinear(nn.Linear):
    """A lora_A that computes something else than x·Aᵀ: what `_LoraDown` would get wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight / self.weight.norm())


def test_shared_autocast_copy_switches_on_per_layer_and_declines_other_lora_a():
    model = with_lora(decoder("llama"))
    layers = lora_layers(model)
    odd = layers["model.layers.0.self_attn.k_proj"]
    odd.lora_A = NormalizedLinear(odd.lora_A.in_features, odd.lora_A.out_features, bias=False)
    assert use_shared_autocast_copy(model, torch.float32).note() is None  # no autocast, nothing to share
    speed_up = use_shared_autocast_copy(model, torch.bfloat16)
    assert len(speed_up.patched) == len(layers) - 1
    assert speed_up.note().startswith(f"shared autocast copy: on {len(layers) - 1} of {len(layers)}, off for "
                                      f"model.layers.0.self_attn.k_proj (probe differs by ")
    assert [name for name, layer in layers.items() if not layer.share_autocast_copy] == [
        "model.layers.0.self_attn.k_proj"]
    # Layers with LoRA dropout read their own dropped-out input: never shared, not probed.
    dropped = tiny_lm("llama")
    add_lora(dropped, 4, 8, "all-linear", dropout=0.1)
    assert use_shared_autocast_copy(dropped, torch.bfloat16).note() is None


# ---------------------------------------------------------------- prepare_model


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_probes_leave_the_random_stream_the_weights_and_the_modes_alone(kind, tiny_models, toy_data, tmp_path):
    """prepare_model's probes draw their inputs from a forked RNG and put everything back, so a seeded
    run draws the same numbers with or without them; its notes say what switched on."""
    torch.manual_seed(0)
    if kind == "bert":
        config = tiny_config("bert")
        config.num_labels, config.attention_probs_dropout_prob, config.hidden_dropout_prob = 3, 0.1, 0.0
        model = with_lora(AutoModelForSequenceClassification.from_config(config), saved=["classifier"])
    else:
        model = with_lora(decoder("llama"))
    model.train()
    model.bert.embeddings.eval() if kind == "bert" else model.model.norm.eval()  # a mixed set of modes
    modes = {name: module.training for name, module in model.named_modules()}
    weights = copy.deepcopy(model.state_dict())
    recipe = recipe_from_dict(toy_recipe(tiny_models[kind], toy_data, tmp_path))
    rng = torch.get_rng_state()
    notes = prepare_model(model, recipe, torch.device("cpu"), torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: module.training for name, module in model.named_modules()} == modes
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name].to(value.dtype)), name  # frozen ones are now stored in bf16
    if kind == "bert":
        assert notes == ["fast attention dropout", "fast dropout", "unpadded encoder", "frozen weights in bf16",
                         "shared autocast copy"]
    else:
        assert notes == ["frozen weights in bf16", "fused gated MLP", "fused RMSNorm", "shared autocast copy"]
