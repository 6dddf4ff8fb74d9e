"""Reliability: exact resume, crash-safe checkpoints, signals, non-finite losses, a full disk."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, save_tiny_model, toy_recipe, write_recipe
from safetensors.torch import load_file, save_file

from lorafit.checkpoint import STATE_FILE, list_checkpoints

STEPS = 60


def resume_recipe(tiny_models, toy_data, out: Path, **train) -> dict:
    # fp32 and LoRA dropout on, so that resuming must restore the RNG to give the same numbers.
    return toy_recipe(tiny_models["bert"], toy_data, out, lora={"dropout": 0.1},
                      optim={"scheduler": "linear", "warmup_ratio": 0.1, "lr": 5e-3},
                      train={"max_steps": STEPS, "precision": "fp32", "log_every": 1, "eval_every": 20,
                             "save_every": 5, **train})


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "split" not in m}


def assert_same_adapter(a: Path, b: Path, context: str = "") -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys(), context
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0,
                                   msg=lambda m, key=key: f"{context} {key}: {m}".strip())


@pytest.fixture(scope="module")
def reference_run(tiny_models, toy_data, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    from rich.console import Console

    from lorafit.recipe import recipe_from_dict
    from lorafit.train import train

    out = tmp_path_factory.mktemp("reference") / "run"
    train(recipe_from_dict(resume_recipe(tiny_models, toy_data, out)), console=Console(quiet=True))
    return out


def test_resume_from_a_checkpoint_reproduces_the_run(reference_run, tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    # Pretend the run died just after step 23: its later checkpoints and final adapter never happened.
    for path in list_checkpoints(out):
        if int(path.name.split("-")[1]) > 20:
            shutil.rmtree(path)
    shutil.rmtree(out / "adapter")
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    result = run_cli("train", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stdout and "step-20" in result.stdout

    expected, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))  # no duplicated lines from the dead run
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert_same_adapter(out / "adapter", reference_run / "adapter")


# The kill step is drawn from a fixed seed, named in the test id: a failure replays with the same step.
@pytest.mark.parametrize("kill_seed", [1], ids=lambda seed: f"kill_seed={seed}")
def test_sigkill_at_a_random_step_then_resume(kill_seed, reference_run, tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_after = random.Random(kill_seed).randint(6, 40)  # any step after the first checkpoint (step 5)
    where = f"kill_seed={kill_seed}: killed once step {kill_after} was logged"
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and any(json.loads(line)["step"] >= kill_after
                                     for line in metrics.read_text().splitlines() if line.endswith("}")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"{where}, but the run ended first: {proc.stderr.read()[-500:]}"
    assert not (out / "adapter").exists()
    where += f" (the last step it logged: {max(train_losses(out))})"

    resumed = run_cli("train", recipe, "--resume")  # in this process: only the killed run needs its own
    assert resumed.exit_code == 0, f"{where}; resume failed: {resumed.output}"
    assert_same_adapter(out / "adapter", reference_run / "adapter", where)
    expected, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == sorted(expected), where
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"{where}; loss of step {step}"


def test_sigterm_checkpoints_and_prints_the_resume_command(reference_run, tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(recipe), "--set", "train.log_every=1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (out / "checkpoints" / "step-5").is_dir():
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    message = " ".join(stderr.split())
    assert f"continue with: lorafit train {recipe} --set train.log_every=1 --resume" in message
    stopped_at = max(train_losses(out))
    assert (out / "checkpoints" / f"step-{stopped_at}" / STATE_FILE).is_file()

    resumed = run_cli("train", recipe, "--set", "train.log_every=1", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_adapter(out / "adapter", reference_run / "adapter")


def test_half_written_checkpoint_is_never_resumed_from(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    latest = list_checkpoints(out)[-1]
    # A temporary directory left by a crash mid-save, and a step directory missing its state.
    shutil.copytree(latest, out / "checkpoints" / ".step-65.tmp-abc")
    broken = out / "checkpoints" / "step-70"
    shutil.copytree(latest, broken)
    (broken / STATE_FILE).unlink()
    assert list_checkpoints(out)[-1] == latest


def test_changed_recipe_is_refused(reference_run, tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    result = run_cli("train", recipe, "--resume", "--set", "lora.rank=2")
    assert result.exit_code == 2
    assert "the recipe changed: lora.rank (4 -> 2); restore those values or start a new run" in (
        " ".join(result.stderr.split()))


def test_resume_without_checkpoints_is_an_error(tiny_models, toy_data, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, tmp_path / "run"))
    result = run_cli("train", recipe, "--resume")
    assert result.exit_code == 2
    assert "--resume: no complete checkpoint in" in result.stderr


def test_keep_checkpoints_prunes_old_ones(tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    raw = resume_recipe(tiny_models, toy_data, out, max_steps=20, keep_checkpoints=2)
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_checkpoints(out)] == ["step-15", "step-20"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-15", "step-20"]


@pytest.fixture
def poisoned_model(tmp_path) -> Path:
    """Tiny BERT whose embedding of the word "moon" is NaN: only batches holding it go non-finite."""
    from conftest import VOCAB

    path = save_tiny_model(tmp_path / "poisoned", "bert")
    weights = load_file(path / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key][VOCAB.index("moon")] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_nonfinite_loss_stops_with_the_step(poisoned_model, toy_data, tmp_path, run_cli):
    raw = toy_recipe(poisoned_model, toy_data, tmp_path / "run", train={"max_steps": 30, "precision": "fp32"})
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "error: non-finite loss at step 1; stopping (no checkpoint yet)" in message
    assert not (tmp_path / "run" / "adapter").exists()


def test_skip_nonfinite_skips_and_counts(poisoned_model, toy_data, tmp_path, run_cli):
    from conftest import toy_rows, write_jsonl

    # Mostly clean data, a few rows with the poisoned word.
    rows = [r for r in toy_rows(96, seed=1) if "moon" not in r["text"]]
    rows[::10] = [{"text": "moon moon the", "label": "space"}] * len(rows[::10])
    data = {**toy_data, "train": write_jsonl(tmp_path / "train.jsonl", rows)}
    raw = toy_recipe(poisoned_model, data, tmp_path / "run", data={"test_split": None, "eval_split": None},
                     train={"max_steps": 30, "precision": "fp32", "skip_nonfinite": True})
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["skipped_nonfinite"] > 0
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").values())


def test_full_disk_while_saving_loses_nothing(tiny_models, toy_data, tmp_path, run_cli, monkeypatch):
    import lorafit.adapter

    out = tmp_path / "run"
    real_save = lorafit.adapter.save_file

    def save_until_disk_full(tensors, path, metadata=None):
        if "step-10" in str(Path(path).parent.name) or ".step-10" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(lorafit.adapter, "save_file", save_until_disk_full)
    raw = resume_recipe(tiny_models, toy_data, out, max_steps=20)
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 2
    assert f"error: could not write {out / 'checkpoints' / 'step-10'}: No space left on device" in (
        "".join(result.stderr.splitlines()))
    # The earlier checkpoint is intact, nothing half-written is left, and resume picks up step 5.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5"]
    assert [p.name for p in list_checkpoints(out)] == ["step-5"]


def test_overwrite_clears_the_old_run_but_nothing_else(reference_run, tiny_models, toy_data, tmp_path, run_cli):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "notes.txt").write_text("mine")
    raw = resume_recipe(tiny_models, toy_data, out, max_steps=4, save_every=None)
    result = run_cli("train", write_recipe(tmp_path / "r.yaml", raw), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoints").exists()  # old checkpoints could otherwise be resumed into the new run
    assert max(train_losses(out)) == 4
    assert (out / "notes.txt").read_text() == "mine"
