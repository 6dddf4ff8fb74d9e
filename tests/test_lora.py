"""The LoRA layer and its injection: math, matching rules, what trains, merging."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from lorafit.errors import LorafitError
from lorafit.lora import LoRALinear, add_lora, find_targets, lora_layers, merge_lora, merged_weight


def tiny(kind: str):
    torch.manual_seed(0)
    config = tiny_config(kind)
    config.num_labels = 3
    return AutoModelForSequenceClassification.from_config(config).eval()


def randomize_lora(model: nn.Module) -> None:
    """Give B non-zero values, as training would, so the update is visible."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("base", [nn.Linear(6, 5), Conv1D(5, 6)])  # Conv1D(nf=out, nx=in)
def test_forward_is_base_plus_scaled_low_rank_update(base):
    torch.manual_seed(0)
    layer = LoRALinear(base, rank=2, alpha=4, dropout=0.0)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    nn.init.normal_(layer.lora_B.weight)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.weight.shape == (2, 6) and layer.lora_B.weight.shape == (5, 2)


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(4, 4), rank=16, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)
    assert LoRALinear(nn.Linear(4, 4), rank=16, alpha=8).scaling == 0.5


def test_no_dropout_module_when_dropout_is_zero():
    assert isinstance(LoRALinear(nn.Linear(4, 4), rank=2, alpha=2, dropout=0.0).dropout, nn.Identity)
    assert isinstance(LoRALinear(nn.Linear(4, 4), rank=2, alpha=2, dropout=0.1).dropout, nn.Dropout)


def test_targets_match_full_names_or_dotted_suffixes_never_substrings():
    model = tiny("bert")
    found = find_targets(model, ["query"])
    assert found == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    full = "bert.encoder.layer.1.attention.self.value"
    assert find_targets(model, [full]) == [full]
    assert find_targets(model, ["self.key"]) == [f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]
    with pytest.raises(LorafitError):
        find_targets(model, ["quer"])  # a substring of "query" is not a match


def test_no_match_lists_real_module_names():
    with pytest.raises(LorafitError) as info:
        find_targets(tiny("bert"), ["q_proj", "v_proj"])
    assert str(info.value) == (
        "lora.target_modules: none of ['q_proj', 'v_proj'] matches a module of the model; its linear layers are "
        "named ['classifier', 'dense', 'key', 'query', 'value']"
    )


def test_non_linear_target_is_an_error():
    with pytest.raises(LorafitError, match="is a BertSelfAttention; LoRA wraps only Linear and Conv1D"):
        find_targets(tiny("bert"), ["attention.self"])


@pytest.mark.parametrize(("kind", "head"), [("bert", "classifier"), ("gpt2", "score"), ("llama", "score")])
def test_all_linear_skips_the_head(kind, head):
    model = tiny(kind)
    found = find_targets(model, "all-linear")
    assert head not in found and found
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert sorted(found + [head]) == sorted(linear)


def test_only_lora_and_saved_modules_train():
    model = tiny("bert")
    plan = add_lora(model, rank=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
                for i in range(2) for m in ("query", "value") for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    assert plan.trainable_params == sum(model.get_parameter(n).numel() for n in expected)
    assert plan.total_params == sum(p.numel() for p in model.parameters())


def test_wrapping_twice_is_an_error():
    model = tiny("bert")
    add_lora(model, rank=4, alpha=8, target_modules=["query"])
    for targets in (["query"], "all-linear"):
        with pytest.raises(LorafitError, match="already has LoRA"):
            add_lora(model, rank=4, alpha=8, target_modules=targets)
    with pytest.raises(LorafitError, match="already has LoRA"):
        find_targets(model, ["query"])


def test_target_in_modules_to_save_is_an_error():
    with pytest.raises(LorafitError, match="is both a LoRA target and in modules_to_save"):
        add_lora(tiny("bert"), rank=4, alpha=8, target_modules=["classifier"], modules_to_save=["classifier"])


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_merge_gives_the_same_logits_and_is_idempotent(kind):
    model = tiny(kind)
    add_lora(model, rank=4, alpha=8, target_modules="all-linear")
    randomize_lora(model)
    ids = torch.randint(5, 20, (2, 7))
    before = model(input_ids=ids).logits
    merge_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)
    merge_lora(model)  # nothing left to merge: a no-op
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)


def test_merged_weight_is_transposed_for_conv1d():
    w = torch.randn(6, 5)  # Conv1D stores (in, out)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    torch.testing.assert_close(merged_weight(w, a, b, 0.5, fan_in_fan_out=True), w + 0.5 * (b @ a).T)
    assert merged_weight(w.bfloat16(), a, b, 0.5, fan_in_fan_out=True).dtype == torch.bfloat16


def test_tied_output_head_cannot_be_saved_in_full():
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))  # lm_head is tied to transformer.wte
    with pytest.raises(LorafitError, match=r"lora.modules_to_save: lm_head shares its weights with transformer.wte "
                                           r"\(tied embeddings\)"):
        add_lora(model, rank=4, alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"])
