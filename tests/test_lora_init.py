"""lora.init: gaussian, and PiSSA/OLoRA saved as a plain LoRA that works on the unmodified base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, read_metrics, tiny_lm, toy_recipe, write_recipe
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from lorafit.adapter import AdapterSpec, load_adapter_model, save_adapter
from lorafit.checkpoint import list_checkpoints
from lorafit.errors import LorafitError
from lorafit.lora import add_lora, init_lora, lora_layers
from lorafit.merge import merge_adapter
from lorafit.models import load_model, load_tokenizer, resolve_model

peft = pytest.importorskip("peft")

LABELS = ["space", "sports", "tech"]
TEXTS = ["the ball and the goal", "a rocket to the moon in orbit", "chip", "disk driver for the chip is it"]


@torch.inference_mode()
def logits(model) -> torch.Tensor:
    batch = make_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def classifier(model_dir: Path):
    source = resolve_model(str(model_dir))
    return load_model(source, "sequence-classification", load_tokenizer(source), LABELS)[0]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(("method", "iters"), [("pissa", None), ("pissa", 2), ("olora", None)])
def test_the_converted_adapter_on_the_original_base_gives_the_trained_models_logits(kind, method, iters, tiny_models,
                                                                                    tmp_path):
    model = classifier(tiny_models[kind])
    head = "classifier" if hasattr(model, "classifier") else "score"
    base_logits = logits(model)
    plan = add_lora(model, 4, 8, "all-linear", modules_to_save=[head])
    init_lora(model, method, iters)
    # The principal part moved from the frozen weight into B·A: the model computes what it did.
    torch.testing.assert_close(logits(model), base_logits, atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move both factors and the head
        for layer in lora_layers(model).values():
            for param in (layer.lora_A.weight, layer.lora_B.weight):
                param.add_(0.1 * param.abs().mean() * torch.randn(param.shape, generator=generator))
        for param in model.get_submodule(head).parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    trained = logits(model)
    spec = AdapterSpec(str(tiny_models[kind]), "sequence-classification", 4, 8.0, 0.0, "all-linear", [head],
                       labels=LABELS)
    adapter = save_adapter(tmp_path / "adapter", model, plan, spec)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (8, 16.0, {})  # rank 2r, same scaling
    assert config["init_lora_weights"] is True
    ours, _, _ = load_adapter_model(adapter)  # onto the original base, loaded afresh
    torch.testing.assert_close(logits(ours), trained, atol=1e-5, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=3)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(base, adapter)), trained, atol=1e-5, rtol=0)
    merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)


def test_pissa_keeps_the_residual_in_the_frozen_weight_and_the_principal_part_in_the_factors(tiny_models):
    model = classifier(tiny_models["bert"])
    name = "bert.encoder.layer.0.attention.self.query"
    original = model.get_submodule(name).weight.detach().clone()
    add_lora(model, 4, 8, [name])
    init_lora(model, "pissa")
    layer = lora_layers(model)[name]
    U, S, Vh = torch.linalg.svd(original)
    principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, principal, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight, original - principal, atol=1e-5, rtol=0)
    assert torch.equal(layer.initial_A, layer.lora_A.weight) and torch.equal(layer.initial_B, layer.lora_B.weight)


def test_gaussian_init_draws_a_with_standard_deviation_one_over_rank(tiny_models):
    model = classifier(tiny_models["bert"])
    add_lora(model, 8, 16, "all-linear")
    torch.manual_seed(0)
    init_lora(model, "gaussian")
    A = torch.cat([layer.lora_A.weight.flatten() for layer in lora_layers(model).values()])
    assert A.std().item() == pytest.approx(1 / 8, rel=0.05) and abs(A.mean().item()) < 0.01
    assert all(layer.lora_B.weight.abs().max() == 0 for layer in lora_layers(model).values())


def test_pissa_refuses_a_tied_weight():
    model = tiny_lm("gpt2")  # lm_head shares its weight with the token embeddings
    add_lora(model, 4, 8, ["lm_head"])
    with pytest.raises(LorafitError) as caught:
        init_lora(model, "pissa")
    assert str(caught.value) == ("lora.init: pissa cannot start lm_head: its weight is tied to another module (shared "
                                 "with the embeddings?), which would change too; leave it out of lora.target_modules "
                                 "or use lora.init: default")


def test_pissa_refuses_a_quantized_weight(tiny_models):
    model = classifier(tiny_models["bert"])
    add_lora(model, 4, 8, ["query"])
    layer = lora_layers(model)["bert.encoder.layer.1.attention.self.query"]
    layer.base.weight = nn.Parameter(torch.zeros(layer.base.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(LorafitError) as caught:
        init_lora(model, "olora")
    assert str(caught.value) == ("lora.init: olora rewrites the base weights, but "
                                 "bert.encoder.layer.1.attention.self.query.weight is torch.int8 (quantized); load the "
                                 "model in float32/float16/bfloat16 or use lora.init: default")


def test_a_pissa_run_resumes_exactly_and_its_adapter_scores_as_the_run_did(tiny_models, toy_data, tmp_path, run_cli):
    def recipe(out: Path) -> Path:
        raw = toy_recipe(tiny_models["bert"], toy_data, out, lora={"init": "pissa", "init_iters": 2},
                         train={"max_steps": 8, "precision": "fp32", "log_every": 1, "save_every": 4,
                                "eval_every": None})
        return write_recipe(tmp_path / f"{out.name}.yaml", raw)

    reference = tmp_path / "reference"
    result = run_cli("train", recipe(reference))
    assert result.exit_code == 0, result.output
    assert "init              pissa (saved as a plain LoRA of twice the rank)" in result.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(list_checkpoints(resumed)[-1])  # the run died after step 4's checkpoint
    result = run_cli("train", recipe(resumed), "--resume")
    assert result.exit_code == 0, result.output
    losses = lambda run: {m["step"]: m["loss"] for m in read_metrics(run) if "split" not in m}  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-6)
    for key, tensor in load_file(reference / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(load_file(resumed / "adapter" / "adapter_model.safetensors")[key], tensor,
                                   atol=1e-6, rtol=0, msg=key)
    # The saved adapter, on the original base, scores the test split as the run's own last evaluation did.
    final = [m for m in read_metrics(reference) if m.get("split") == "test"][-1]
    result = run_cli("eval", reference, "--output", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["accuracy"] == final["accuracy"] and report["loss"] == pytest.approx(final["loss"], abs=1e-5)
