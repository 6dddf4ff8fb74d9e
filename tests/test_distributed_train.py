"""`lorafit train` under torchrun with DDP on two CPU ranks (gloo) against one process: 2 ranks ×
batch 4 must make the updates of 1 process × batch 8: the same logged losses, evaluation metrics and
adapter tensors (1e-5), with and without gradient accumulation, for each task. And failures: a rank
killed alone, SIGTERM to the launcher, and resuming after them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import WORDS, Job, lm_recipe, read_metrics, run_job, toy_recipe, write_jsonl, write_recipe
from safetensors.torch import load_file

from lorafit.checkpoint import STATE_FILE, list_checkpoints

REPO = Path(__file__).parent.parent
# 17 training examples, global batch 8: the epoch's last batch holds 1 example, so one rank's share is empty.
TRAIN_EXAMPLES = 17


def lorafit_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def lorafit_train(recipe: Path, *args: str, nproc: int | None = None, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`lorafit train RECIPE ARGS` in one process, or on `nproc` ranks (one thread each) started by
    torchrun, or with `launcher="--nproc"` by `lorafit train --nproc`."""
    command = [sys.executable, "-m", "lorafit", "train", str(recipe), *args]
    if nproc and launcher == "torchrun":
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    elif nproc:
        command += ["--nproc", str(nproc)]
    return run_job(command, lorafit_env(), timeout=180, cwd=REPO)


def lm_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
             "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))} for _ in range(n)]


def task_recipe(task: str, tiny_models, lm_model_dirs, toy_data, tmp_path: Path, out: Path, **train) -> dict:
    train = {"epochs": 2, "max_steps": None, "precision": "fp32", "log_every": 1, "eval_every": 2, "save_every": None,
             "eval_splits": ["eval", "test"] if task == "sequence-classification" else ["eval"], **train}
    if task == "sequence-classification":
        return toy_recipe(tiny_models["bert"], toy_data, out, train=train,
                          data={"max_train_samples": TRAIN_EXAMPLES, "max_eval_samples": 11})
    data = {"train": write_jsonl(tmp_path / "train.jsonl", lm_rows(TRAIN_EXAMPLES, 1)),
            "eval": write_jsonl(tmp_path / "eval.jsonl", lm_rows(7, 2))}
    return lm_recipe(lm_model_dirs["llama"], data, out, train=train,
                     data={"prompt_column": "prompt", "completion_column": "completion", "eval_split": "eval"})


def assert_same_run(single: Path, ddp: Path) -> None:
    one, two = read_metrics(single), read_metrics(ddp)
    assert [(m["step"], m.get("split")) for m in one] == [(m["step"], m.get("split")) for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "accuracy", "macro_f1", "perplexity", "tokens", "grad_norm", "lr"):
            if key in a:  # perplexity is exp(loss): its error is relative
                assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5 if key == "perplexity" else 0), (a, b, key)
    wa, wb = load_file(single / "adapter" / "adapter_model.safetensors"), load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].numel() > 0
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    summary_one, summary_two = (json.loads((d / "summary.json").read_text()) for d in (single, ddp))
    for split in ("eval", "test"):
        if split in summary_one:
            assert summary_two[split] == pytest.approx(summary_one[split], abs=1e-5)


# Each task and each strategy, with and without accumulation (two processes per run are slow on
# 2 cores, so not every combination).
@pytest.mark.parametrize("task,accum,launcher,strategy", [("sequence-classification", 2, "torchrun", "ddp"),
                                                          ("causal-lm", 1, "--nproc", "ddp"),
                                                          ("sequence-classification", 1, "torchrun", "fsdp"),
                                                          ("causal-lm", 2, "torchrun", "fsdp")])
def test_two_ranks_equal_one_process_with_twice_the_batch(task, accum, launcher, strategy, tiny_models, lm_model_dirs,
                                                          toy_data, tmp_path):
    runs = {}
    for name, batch_size, nproc in (("single", 8, None), (strategy, 4, 2)):
        out = tmp_path / name
        recipe = task_recipe(task, tiny_models, lm_model_dirs, toy_data, tmp_path, out, batch_size=batch_size,
                             grad_accum_steps=accum, distributed=strategy if nproc else None)
        done = lorafit_train(write_recipe(tmp_path / f"{name}.yaml", recipe), nproc=nproc, launcher=launcher)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[name] = (out, done.stdout)
    assert_same_run(runs["single"][0], runs[strategy][0])
    assert f"2 processes ({strategy}), global batch {8 * accum}" in runs[strategy][1]
    steps = [m["step"] for m in read_metrics(runs[strategy][0]) if "split" not in m]
    assert steps == list(range(1, 2 * -(-3 // accum) + 1))  # 3 global batches per epoch, 2 epochs


# ---------------------------------------------------------------- failures and resume

STEPS = 30


def resume_recipe(tiny_models, toy_data, out: Path) -> dict:
    # LoRA dropout on: resuming must restore every rank's RNG to give the same numbers.
    return toy_recipe(tiny_models["bert"], toy_data, out, lora={"dropout": 0.1},
                      train={"max_steps": STEPS, "batch_size": 4, "precision": "fp32", "log_every": 1,
                             "eval_every": None, "save_every": 2, "keep_checkpoints": 2})


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun (`launcher_pid`) started, read from their environments."""
    workers = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        env = dict(item.split("=", 1) for item in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in item)
        if "RANK" in env:
            workers[int(env["RANK"])] = int(child)
    return workers


def start_ddp_run(recipe: Path, *args: str) -> Job:
    return Job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lorafit",
                "train", str(recipe), *args], lorafit_env(), cwd=REPO, stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(job: Job, out: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / f"step-{step}").is_dir():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill_all()
            pytest.fail(f"the run ended or hung before its checkpoint at step {step}: {job.communicate()[1][-3000:]}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def ddp_reference(tiny_models, toy_data, tmp_path_factory) -> Path:
    """An uninterrupted run on 2 ranks: what every interrupted, resumed one must reproduce."""
    root = tmp_path_factory.mktemp("ddp-reference")
    done = lorafit_train(write_recipe(root / "r.yaml", resume_recipe(tiny_models, toy_data, root / "run")), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


def test_a_killed_rank_stops_the_job_and_resume_finishes_it(ddp_reference, tiny_models, toy_data, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    job = start_ddp_run(recipe)
    wait_for_checkpoint(job, out, 4)
    os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    stderr = job.finish(timeout=120).stderr
    assert job.returncode != 0, stderr[-2000:]
    assert time.monotonic() - killed < 60  # rank 0 is stopped, not left waiting for ever
    assert not (out / "adapter").exists()
    last = list_checkpoints(out)[-1]  # the newest complete checkpoint is readable
    assert load_file(last / "adapter_model.safetensors")
    assert torch.load(last / STATE_FILE, weights_only=True)["world_size"] == 2

    resumed = lorafit_train(recipe, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = {m["step"]: m["loss"] for m in read_metrics(ddp_reference) if "split" not in m}
    got = {m["step"]: m["loss"] for m in read_metrics(out) if "split" not in m}
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ddp_reference, out))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_checkpoints_and_every_rank_exits(target, tiny_models, toy_data, tmp_path):
    """SIGTERM to torchrun (which passes it to every rank) or to one rank alone: the ranks agree to
    stop after the same step, rank 0 writes its checkpoint, and all exit."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    job = start_ddp_run(recipe)
    wait_for_checkpoint(job, out, 2)
    workers = worker_pids(job.pid)
    os.kill(job.pid if target == "launcher" else workers[1], signal.SIGTERM)
    stderr = job.finish(timeout=120).stderr
    assert job.returncode != 0
    message = " ".join(stderr.split())
    stopped_at = max(m["step"] for m in read_metrics(out) if "split" not in m)
    assert f"interrupted by signal 15 after step {stopped_at}" in message
    assert list_checkpoints(out)[-1].name == f"step-{stopped_at}"  # rank 0 saved the step all ranks stopped after
    for pid in workers.values():  # every rank is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_fsdp_stopped_and_resumed_equals_the_uninterrupted_run(tiny_models, toy_data, tmp_path):
    """FSDP checkpoints gather the adapter and the optimizer's state from the shards: stopped by a
    signal after a checkpoint and resumed, an FSDP run ends as the uninterrupted one does."""
    runs = {}
    for name in ("reference", "run"):
        raw = resume_recipe(tiny_models, toy_data, tmp_path / name)
        raw["train"].update(distributed="fsdp", max_steps=12)
        runs[name] = write_recipe(tmp_path / f"{name}.yaml", raw)
    done = lorafit_train(runs["reference"], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    job = start_ddp_run(runs["run"])
    wait_for_checkpoint(job, out, 4)
    os.kill(worker_pids(job.pid)[1], signal.SIGTERM)
    stderr = job.finish(timeout=120).stderr
    assert "interrupted by signal 15" in stderr
    assert max(m["step"] for m in read_metrics(out) if "split" not in m) < 12
    resumed = lorafit_train(runs["run"], "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path / "reference"
    expected = {m["step"]: m["loss"] for m in read_metrics(reference) if "split" not in m}
    got = {m["step"]: m["loss"] for m in read_metrics(out) if "split" not in m}
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (reference, out))
    assert wa.keys() == wb.keys() and all(v.numel() for v in wb.values())
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0)
