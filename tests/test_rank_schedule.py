"""lora.rank_schedule: ranks cut during training to a global budget shared by singular-value energy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, read_metrics, tiny_config, toy_recipe, write_recipe
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lorafit.adapter import load_adapter_model
from lorafit.checkpoint import list_checkpoints
from lorafit.errors import LorafitError
from lorafit.lora import add_lora, lora_layers
from lorafit.lowrank import allocate_ranks, singular_values
from lorafit.rank_schedule import cut_ranks, swap_parameters
from lorafit.recipe import recipe_from_dict

peft = pytest.importorskip("peft")

TEXTS = ["the ball and the goal", "a rocket to the moon in orbit", "chip", "disk driver for the chip is it"]


def tiny_bert_with_lora():
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config)
    add_lora(model, 4, 8, "all-linear", modules_to_save=["classifier"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator)
                                      * torch.rand(1, 4, generator=generator))  # spectra that differ per module
    return model


def test_a_cut_keeps_the_best_approximation_within_the_budget_and_resets_only_the_cut_state():
    model = tiny_bert_with_lora()
    layers = lora_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    with torch.no_grad():
        deltas = {name: layer.delta_weight().double() for name, layer in layers.items()}
        spectra = {name: singular_values(layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
                   for name, layer in layers.items()}
    before = {name: (layer.lora_A.weight, layer.lora_B.weight) for name, layer in layers.items()}

    cut, replaced = cut_ranks(model, 40)
    assert cut.ranks == allocate_ranks(spectra, 40) and sum(cut.ranks.values()) == cut.total_after == 40
    assert cut.total_before == 4 * len(layers) and {1, 3, 4} <= set(cut.ranks.values())  # cut, and kept
    kept = sum(float((spectra[n][:k] ** 2).sum()) for n, k in cut.ranks.items())
    assert cut.energy_kept == pytest.approx(kept / sum(float((s ** 2).sum()) for s in spectra.values()))
    for name, layer in layers.items():
        U, S, Vh = torch.linalg.svd(deltas[name], full_matrices=False)
        best = U[:, :layer.rank] @ torch.diag(S[:layer.rank]) @ Vh[:layer.rank]
        torch.testing.assert_close(layer.delta_weight().detach().double(), best, atol=1e-6, rtol=0, msg=name)

    swap_parameters(optimizer, replaced, trainable)
    params = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, layer in layers.items():
        for old, new in zip(before[name], (layer.lora_A.weight, layer.lora_B.weight)):
            if layer.rank < 4:  # new factors, no state: Adam starts afresh on them
                assert id(new) in params and id(old) not in params
                assert new not in optimizer.state and old not in optimizer.state
            else:  # untouched, state kept
                assert new is old and old in optimizer.state
    assert optimizer.state[model.classifier.weight]["step"] == 1
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()  # the optimizer runs on the new shapes


def schedule_recipe(tiny_models, toy_data, out: Path, **train) -> dict:
    return toy_recipe(tiny_models["bert"], toy_data, out, lora={"dropout": 0.1, "rank_schedule": {3: 3, 6: 2}},
                      train={"max_steps": 9, "precision": "fp32", "log_every": 1, "save_every": 3, "eval_every": None,
                             **train})


@pytest.fixture(scope="module")
def schedule_run(tiny_models, toy_data, tmp_path_factory) -> tuple[Path, str]:
    from typer.testing import CliRunner

    from lorafit.cli import app

    out = tmp_path_factory.mktemp("schedule") / "run"
    recipe = write_recipe(out.parent / "r.yaml", schedule_recipe(tiny_models, toy_data, out))
    result = CliRunner().invoke(app, ["train", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_a_schedule_ends_at_its_budget_and_the_adapter_loads_in_peft(schedule_run, tiny_models, run_cli):
    out, stdout = schedule_run
    modules = 13  # all-linear on tiny BERT
    assert f"step 3: ranks cut from {4 * modules} to {3 * modules} in all" in stdout
    assert f"step 6: ranks cut from {3 * modules} to {2 * modules} in all" in stdout
    report = json.loads(run_cli("inspect", out, "--json").stdout)
    assert report["total_rank"] == 2 * modules and len({m["rank"] for m in report["modules"]}) > 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and all(m["scaling"] == 2.0 for m in report["modules"])  # alpha follows rank
    ours, _, _ = load_adapter_model(out / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    batch = make_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("resume_after", [3, 6])  # the checkpoint of a cut's own step, and one between cuts
def test_resuming_across_cuts_reproduces_the_run(resume_after, schedule_run, tiny_models, toy_data, tmp_path, run_cli):
    reference, _ = schedule_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    for path in list_checkpoints(out):
        if int(path.name.split("-")[1]) > resume_after:
            shutil.rmtree(path)
    recipe = write_recipe(tmp_path / "r.yaml", schedule_recipe(tiny_models, toy_data, out))
    result = run_cli("train", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert ("step 6: ranks cut" in result.stdout) == (resume_after < 6)
    losses = lambda run: {m["step"]: m["loss"] for m in read_metrics(run) if "split" not in m}  # noqa: E731
    assert losses(out) == pytest.approx(losses(reference), abs=1e-6)
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize(("lora", "train", "message"), [
    ({"rank_schedule": {100: 4, 200: 6}}, {}, "lora.rank_schedule: the mean ranks must fall, step after step, from "
                                              "below lora.rank (8); got {100: 4.0, 200: 6.0}"),
    ({"rank_schedule": {100: 8}}, {}, "lora.rank_schedule: the mean ranks must fall, step after step, from below "
                                      "lora.rank (8); got {100: 8.0}"),
    ({"rank_schedule": {0: 4}}, {}, "lora.rank_schedule: {0: 4.0} is out of range: give {step: mean rank} with steps "
                                    "> 0 and mean ranks >= 1, e.g. {600: 8, 1200: 4}"),
    ({"rank_schedule": {"soon": 4}}, {}, "lora.rank_schedule: {'soon': 4} (dict) is not valid: expected a mapping of "
                                         "an integer to a number"),
    ({"rank_schedule": {50: 4}}, {"max_steps": 40}, "lora.rank_schedule: step 50 is past train.max_steps (40)"),
    ({"rank_schedule": {50: 4}, "init": "olora"}, {}, "lora.rank_schedule: cutting ranks and lora.init: olora exclude "
                                                      "each other (the cut would truncate the principal part too); "
                                                      "pick one"),
    ({"init_iters": 4}, {}, "lora.init_iters: only for lora.init: pissa (the init is 'default'); remove it"),
])
def test_bad_schedules_and_inits_are_reported(lora, train, message):
    with pytest.raises(LorafitError) as caught:
        recipe_from_dict({"name": "r", "model": {"name": "m"}, "lora": lora, "train": train})
    assert str(caught.value) == f"recipe: {message}"


def test_a_cut_after_the_last_step_is_an_error(tiny_models, toy_data, tmp_path, run_cli):
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "out", lora={"rank_schedule": {50: 2}})
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))  # 1 epoch of 96 examples: 12 steps
    assert result.exit_code == 2
    assert " ".join(result.stderr.split()) == ("error: lora.rank_schedule: step 50 is past the end of the run "
                                               "(12 steps); cut earlier or train longer")
