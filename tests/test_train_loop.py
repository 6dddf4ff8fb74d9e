"""The training loop's arithmetic: gradient accumulation (and resuming inside it), the learning-rate
schedule, and the weight-decay groups."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from conftest import WORDS, lm_recipe, read_metrics, tiny_config, toy_recipe, write_jsonl
from rich.console import Console
from safetensors.torch import load_file

import lorafit.tasks.causal_lm
import lorafit.train
from lorafit.lora import add_lora
from lorafit.recipe import recipe_from_dict
from lorafit.train import build_optimizer, lr_lambda, train

# ---------------------------------------------------------------- gradient accumulation

N_TEXTS = 40  # 5 micro-batches of 8 per epoch: steps of 2, 2 and 1 micro-batches, as batches of 16, 16 and 8
ACCUM_STEPS = 7  # two epochs and a bit


def accum_recipe(model_dir: Path, data: dict[str, Path], out: Path, batch_size: int, grad_accum_steps: int) -> dict:
    # No dropout, fp32, and batches in shuffled order without length grouping: batch_order's
    # permutation then depends on (seed, epoch) alone, so batch 16 × 1 and batch 8 × 2 see the
    # same 16 examples at every step.
    return lm_recipe(model_dir, data, out, data={"eval_split": "eval"},
                     optim={"warmup_ratio": 0.25, "scheduler": "linear"},
                     train={"max_steps": ACCUM_STEPS, "batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
                            "group_by_length": False, "precision": "fp32", "log_every": 1, "save_every": 1})


@pytest.fixture(scope="module")
def accum_data(tmp_path_factory) -> dict[str, Path]:
    """Texts of 3-12 words, so micro-batches differ in their number of labelled tokens."""
    root = tmp_path_factory.mktemp("accum-data")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))} for _ in range(N_TEXTS)]
    return {"train": write_jsonl(root / "train.jsonl", rows), "eval": write_jsonl(root / "eval.jsonl", rows[:4])}


@pytest.fixture(scope="module")
def accum_runs(lm_model_dirs, accum_data, tmp_path_factory) -> dict[str, Path]:
    """The same training as one batch of 16 per step and as two accumulated micro-batches of 8."""
    root = tmp_path_factory.mktemp("accum-runs")
    runs = {}
    for name, batch_size, accum in (("16x1", 16, 1), ("8x2", 8, 2)):
        raw = accum_recipe(lm_model_dirs["llama"], accum_data, root / name, batch_size, accum)
        train(recipe_from_dict(raw), console=Console(quiet=True))
        runs[name] = root / name
    return runs


def train_lines(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run) if "split" not in m}


def assert_same_training(run: Path, reference: Path) -> None:
    """Same steps with the same loss and gradient norm, and the same adapter at the end."""
    got, expected = train_lines(run), train_lines(reference)
    assert sorted(got) == sorted(expected) == list(range(1, ACCUM_STEPS + 1))
    for step in expected:
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    ours, theirs = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, reference))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_two_micro_batches_of_8_update_as_one_batch_of_16(accum_runs):
    assert_same_training(accum_runs["8x2"], accum_runs["16x1"])
    lora_B = [t for k, t in load_file(accum_runs["8x2"] / "adapter" / "adapter_model.safetensors").items()
              if k.endswith("lora_B.weight")]
    assert all(t.abs().max() > 1e-3 for t in lora_B)  # training moved the adapter


class Killed(Exception):
    """Stands in for the process dying."""


# The accumulated run computes its micro-batch losses in this order (steps 3 and 6 end an epoch with
# one micro-batch): step 1: calls 1-2, step 2: 3-4, step 3: 5, step 4: 6-7, step 5: 8-9, ...
@pytest.mark.parametrize("kill_at_call, resumes_from", [(7, 3), (9, 4)],
                         ids=["in-step-4-after-an-epoch-end", "in-step-5-mid-epoch"])
def test_dying_between_micro_batches_then_resuming_gives_the_same_training(
        kill_at_call, resumes_from, accum_runs, lm_model_dirs, accum_data, tmp_path, monkeypatch):
    """The process dies after a step's first micro-batch went backward, before the optimizer step.
    Checkpoints are written only after optimizer steps, so the resume must start that step again
    from its first micro-batch: not count that micro-batch twice, and not skip it."""
    out = tmp_path / "run"
    raw = accum_recipe(lm_model_dirs["llama"], accum_data, out, 8, 2)
    real_loss, calls = lorafit.tasks.causal_lm.lm_loss, []

    def dies_mid_step(model, batch):
        calls.append(1)
        if len(calls) == kill_at_call:
            raise Killed
        return real_loss(model, batch)

    monkeypatch.setattr(lorafit.tasks.causal_lm, "lm_loss", dies_mid_step)
    with pytest.raises(Killed):
        train(recipe_from_dict(raw), console=Console(quiet=True))
    monkeypatch.setattr(lorafit.tasks.causal_lm, "lm_loss", real_loss)
    assert max(train_lines(out)) == resumes_from and not (out / "adapter").exists()

    train(recipe_from_dict(raw), console=Console(quiet=True), resume="latest")
    assert_same_training(out, accum_runs["8x2"])
    assert_same_training(out, accum_runs["16x1"])


# ---------------------------------------------------------------- learning-rate schedule

# 8 steps, warmup_ratio 0.25: 2 warmup steps. The multiplier for 0-based step s, by hand:
# warmup (s + 1) / 3; then linear 1 - (s - 2) / 6, cosine (1 + cos(pi (s - 2) / 6)) / 2, constant 1.
R3 = math.sqrt(3) / 4
SCHEDULES = {
    "linear": [1 / 3, 2 / 3, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0],
    "cosine": [1 / 3, 2 / 3, 1, 0.5 + R3, 0.75, 0.5, 0.25, 0.5 - R3, 0],
    "constant": [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1],
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_lr_lambda_values(kind):
    assert [lr_lambda(s, 2, 8, kind) for s in range(9)] == pytest.approx(SCHEDULES[kind], abs=1e-12)
    assert lr_lambda(0, 0, 8, kind) == 1  # no warmup: the full rate from the first step
    assert lr_lambda(12, 2, 8, kind) == SCHEDULES[kind][-1]  # past the end: stays at the last value


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_training_applies_and_logs_the_schedule(kind, tiny_models, toy_data, tmp_path, monkeypatch):
    applied: list[list[float]] = []
    real_build = lorafit.train.build_optimizer

    def recording_optimizer(model, recipe):
        optimizer = real_build(model, recipe)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(
            [group["lr"] for group in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(lorafit.train, "build_optimizer", recording_optimizer)
    raw = toy_recipe(tiny_models["bert"], toy_data, tmp_path / "run", data={"test_split": None},
                     optim={"lr": 0.02, "warmup_ratio": 0.25, "scheduler": kind},
                     train={"max_steps": 8, "log_every": 1, "eval_every": None, "save_every": None})
    train(recipe_from_dict(raw), console=Console(quiet=True))
    expected = [0.02 * m for m in SCHEDULES[kind]]
    # Optimizer step k (1-based) runs at the multiplier of 0-based step k - 1, in every parameter group.
    assert len(applied) == 8 and all(len(set(lrs)) == 1 for lrs in applied)
    assert [lrs[0] for lrs in applied] == pytest.approx(expected[:8], rel=1e-12)
    # The lr logged with step k is the scheduler's rate after that step: the one step k + 1 runs at.
    logged = {step: m["lr"] for step, m in train_lines(tmp_path / "run").items()}
    assert [logged[k] for k in range(1, 9)] == pytest.approx(expected[1:], rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- weight decay


def model_with_lora(kind: str, modules_to_save: list[str]):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(kind)
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config)
    add_lora(model, 4, 8, "all-linear", modules_to_save=modules_to_save)
    return model


# Trained in full besides the head: a norm, so both groups hold more than LoRA matrices and biases.
DECAY_CASES = {
    "bert": (["classifier", "bert.embeddings.LayerNorm"], {"classifier.weight"},
             {"classifier.bias", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"}),
    "llama": (["score", "model.norm"], {"score.weight"}, {"model.norm.weight"}),
}


@pytest.mark.parametrize("kind", sorted(DECAY_CASES))
def test_weight_decay_on_matrices_only(kind):
    saved, decayed_full, not_decayed = DECAY_CASES[kind]
    model = model_with_lora(kind, saved)
    recipe = recipe_from_dict({"name": "x", "model": {"name": "m"}, "optim": {"lr": 0.01, "weight_decay": 0.1}})
    optimizer = build_optimizer(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups]
    lora = {n for n in names.values() if n.endswith(("lora_A.weight", "lora_B.weight"))}
    assert len(lora) > 0
    assert groups == [(lora | decayed_full, 0.1), (not_decayed, 0.0)]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | decayed_full | not_decayed

    # One AdamW step by hand: p(1 - lr·wd) - lr·m̂/(√v̂ + eps); on the first step m̂ = g and v̂ = g².
    torch.manual_seed(1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = {id(p): p.detach().clone() for p in params}
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name, old, grad = names[id(p)], before[id(p)], p.grad
            expected = old * (1 - 0.01 * group["weight_decay"]) - 0.01 * grad / (grad.abs() + 1e-8)
            torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
