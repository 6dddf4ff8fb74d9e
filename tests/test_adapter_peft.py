"""PEFT as the oracle: it loads our adapters, we load its adapters, and both give the same logits."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, save_tiny_model, toy_recipe
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from lorafit.adapter import WEIGHTS_FILE, load_adapter_model
from lorafit.errors import LorafitError
from lorafit.lora import lora_layers
from lorafit.recipe import recipe_from_dict
from lorafit.train import train

peft = pytest.importorskip("peft")

TEXTS = ["the ball and the goal", "a rocket to the moon in orbit", "chip", "disk driver for the chip is it"]


def batch():
    return make_tokenizer()(TEXTS, padding=True, return_tensors="pt")


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        enc = batch()
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.fixture(scope="module")
def our_adapters(tiny_models, toy_data, tmp_path_factory) -> dict[str, Path]:
    """A few fp32 training steps per model, so lora_B and the head are no longer at their init."""
    adapters = {}
    for kind, model_dir in tiny_models.items():
        out = tmp_path_factory.mktemp(f"run-{kind}")
        raw = toy_recipe(model_dir, toy_data, out, train={"max_steps": 6, "precision": "fp32", "save_every": None,
                                                          "eval_every": None})
        train(recipe_from_dict(raw), console=Console(quiet=True), overwrite=True)
        adapters[kind] = out / "adapter"
    return adapters


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_peft_loads_our_adapter_with_same_logits(kind, tiny_models, our_adapters):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, our_adapters[kind])
    messages = [str(w.message).lower() for w in caught]
    assert not [m for m in messages if "missing" in m or "unexpected" in m or "unknown" in m], messages

    ours, _, spec = load_adapter_model(our_adapters[kind])
    assert spec.labels == ["space", "sports", "tech"]
    torch.testing.assert_close(logits(peft_model), logits(ours), atol=1e-5, rtol=0)
    # And the adapter is not a no-op: the logits differ from the base model with our head.
    lora_b = [v for k, v in load_file(our_adapters[kind] / WEIGHTS_FILE).items() if k.endswith("lora_B.weight")]
    assert all(b.abs().sum() > 0 for b in lora_b)


PEFT_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_we_load_a_peft_adapter_with_same_logits(kind, use_rslora, tiny_models, tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=3)
    # r 4, alpha 8: rsLoRA scales B·A by 8/√4 = 4, plain LoRA by 8/4 = 2.
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=PEFT_TARGETS[kind],
                             fan_in_fan_out=kind == "gpt2", use_rslora=use_rslora)
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: move B and the head away from their init
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.2)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    expected = logits(peft_model)

    ours, _, spec = load_adapter_model(tmp_path / "peft-adapter", base=str(tiny_models[kind]))
    assert spec.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]  # no lorafit.json: taken from the head's shape
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)


def test_peft_loads_our_rslora_adapter_with_same_logits(tiny_models, toy_data, tmp_path):
    out = tmp_path / "run"
    raw = toy_recipe(tiny_models["llama"], toy_data, out, lora={"use_rslora": True},
                     train={"max_steps": 6, "precision": "fp32", "save_every": None, "eval_every": None})
    train(recipe_from_dict(raw), console=Console(quiet=True))
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["use_rslora"], config["r"], config["lora_alpha"]) == (True, 4, 8)

    ours = load_adapter_model(adapter)[0]
    assert {layer.scaling for layer in lora_layers(ours).values()} == {4.0}  # 8/√4, not 8/4
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=3)
    expected = logits(ours)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(base, adapter)), expected, atol=1e-5, rtol=0)

    # The flag carries weight here: the same tensors read as plain LoRA give other logits.
    plain = copy_adapter(adapter, tmp_path / "plain")
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": False}))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=3)
    assert (logits(peft.PeftModel.from_pretrained(base, plain)) - expected).abs().max() > 1e-3


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_key_is_an_error(our_adapters, tmp_path):
    adapter = copy_adapter(our_adapters["bert"], tmp_path / "a")
    weights = load_file(adapter / WEIGHTS_FILE)
    dropped = next(k for k in weights if k.endswith("lora_A.weight"))
    del weights[dropped]
    save_file(weights, adapter / WEIGHTS_FILE)
    with pytest.raises(LorafitError, match=rf"adapter does not fit the model: keys 1 missing \(e.g. {dropped}\)"):
        load_adapter_model(adapter)


def test_unexpected_key_is_an_error(our_adapters, tmp_path):
    adapter = copy_adapter(our_adapters["bert"], tmp_path / "a")
    weights = load_file(adapter / WEIGHTS_FILE)
    weights["base_model.model.bert.embeddings.word_embeddings.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, adapter / WEIGHTS_FILE)
    with pytest.raises(LorafitError, match=r"keys 1 unexpected \(e.g. base_model.model.bert.embeddings.word_embeddings.lora_A"):
        load_adapter_model(adapter)


def test_adapter_for_another_base_is_an_error(our_adapters, tmp_path):
    other = tmp_path / "wide-bert"
    save_tiny_model(other, "bert")
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=48, intermediate_size=96)
    (other / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(
        AutoModelForSequenceClassification.from_pretrained(other, ignore_mismatched_sizes=True).config
    ).save_pretrained(other)
    with pytest.raises(LorafitError, match=r"adapter does not fit the base model: .* has shape \(4, 32\), "
                                           r"the model needs \(4, 48\)"):
        load_adapter_model(our_adapters["bert"], base=str(other))


def test_truncated_weights_file_is_an_error(our_adapters, tmp_path):
    adapter = copy_adapter(our_adapters["bert"], tmp_path / "a")
    data = (adapter / WEIGHTS_FILE).read_bytes()
    (adapter / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(LorafitError, match="the file is corrupted or truncated"):
        load_adapter_model(adapter)


def test_adapter_directory_missing_a_file(our_adapters, tmp_path):
    adapter = copy_adapter(our_adapters["bert"], tmp_path / "a")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(LorafitError, match="is not a complete adapter: adapter_config.json is missing"):
        load_adapter_model(adapter)


def test_unsupported_peft_options_are_refused(our_adapters, tmp_path):
    adapter = copy_adapter(our_adapters["bert"], tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError, match="use_dora=True is not supported by lorafit"):
        load_adapter_model(adapter)


def test_saved_config_is_pure_peft(our_adapters):
    config = json.loads((our_adapters["bert"] / "adapter_config.json").read_text())
    known = set(peft.LoraConfig.__dataclass_fields__)
    assert set(config) <= known
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["modules_to_save"] == ["classifier"]
    # all-linear on tiny BERT: every Linear but the classifier, written as leaf names that select exactly those.
    assert config["target_modules"] == ["dense", "key", "query", "value"]
