"""`lorafit train` under torchrun with DDP or FSDP on two CPU ranks (gloo) against one process: 2 ranks
× batch 4 must make the updates of 1 process × batch 8: the same logged losses, evaluation metrics
(evaluation shared by the ranks, on splits of odd size) and adapter tensors (1e-5), with and without
gradient accumulation, for each task. And failures: a rank killed alone, SIGTERM to the launcher or
to one rank, and resuming after them."""

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
from lorafit.tasks import get_task

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


@pytest.fixture(scope="module")
def task_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny seq2seq (BART) and token-classification (BERT body, no head) bases, saved as pretrained."""
    from test_seq2seq import make_tokenizer, tiny_model
    from test_token_classification import save_base_without_head

    root = tmp_path_factory.mktemp("task-models")
    tiny_model("bart").save_pretrained(root / "bart")
    make_tokenizer().save_pretrained(root / "bart")
    return {"seq2seq": root / "bart", "token-classification": save_base_without_head(root / "tagger", "bert")}


def task_recipe(task: str, tiny_models, lm_model_dirs, task_models, toy_data, root: Path, out: Path, **train) -> dict:
    """A 2-epoch recipe of `task` on 17 training examples, evaluated every 2 steps on splits of 11
    (classification: eval and test) or 7 examples: sizes that 2 ranks cannot share evenly. No
    tokenization cache: the single-process runs are made in this process, before any test's cache."""
    from test_seq2seq import pairs, s2s_recipe
    from test_token_classification import ner_recipe, toy_sentences

    train = {"epochs": 2, "max_steps": None, "precision": "fp32", "log_every": 1, "eval_every": 2, "save_every": None,
             "eval_splits": ["eval", "test"] if task == "sequence-classification" else ["eval"], **train}
    rows = {"causal-lm": lm_rows, "seq2seq": pairs, "token-classification": toy_sentences}.get(task)
    data = rows and {"train": write_jsonl(root / f"{task}-train.jsonl", rows(TRAIN_EXAMPLES, 1)),
                     "eval": write_jsonl(root / f"{task}-eval.jsonl", rows(7, 2))}
    if task == "sequence-classification":
        return toy_recipe(tiny_models["bert"], toy_data, out, train=train,
                          data={"max_train_samples": TRAIN_EXAMPLES, "max_eval_samples": 11, "cache": False})
    if task == "causal-lm":
        return lm_recipe(lm_model_dirs["llama"], data, out, train=train,
                         data={"prompt_column": "prompt", "completion_column": "completion", "eval_split": "eval",
                               "cache": False})
    if task == "seq2seq":
        recipe = s2s_recipe(task_models[task], data, out, train=train)
    else:
        recipe = ner_recipe(task_models[task], data, out, **train)
    recipe["data"].update(eval_split="eval", test_split=None, cache=False)
    return recipe


TIMING = {"samples_per_s", "tokens_per_s", "elapsed_s"}


def assert_same_run(single: Path, ddp: Path) -> None:
    """The same steps and evaluations logged, every logged number but timings (1e-5; perplexity, an
    exponential, relatively), the final metrics, and the adapter's tensors (1e-5, none empty)."""
    one, two = read_metrics(single), read_metrics(ddp)
    assert [(m["step"], m.get("split")) for m in one] == [(m["step"], m.get("split")) for m in two]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a.keys() - TIMING - {"split"}:
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


# Gradient accumulation steps per task: each strategy runs with and without (DDP: classification
# and token classification without, causal LM and seq2seq with; FSDP: classification without,
# causal LM with), and one task's strategies share its single-process run.
ACCUM = {"sequence-classification": 1, "causal-lm": 2, "seq2seq": 2, "token-classification": 1}


@pytest.fixture(scope="module")
def single_runs(tiny_models, lm_model_dirs, task_models, toy_data, tmp_path_factory):
    """`run(task)`: the task's one-process run with batch 8 (made in this process on first use: a
    process of its own would cost imports, not checks), shared by the tests of each strategy."""
    from rich.console import Console

    from lorafit.recipe import recipe_from_dict
    from lorafit.train import train

    root = tmp_path_factory.mktemp("single")
    runs: dict[str, Path] = {}

    def run(task: str) -> Path:
        if task not in runs:
            out = root / task
            train(recipe_from_dict(task_recipe(task, tiny_models, lm_model_dirs, task_models, toy_data, root, out,
                                               batch_size=8, grad_accum_steps=ACCUM[task])),
                  console=Console(quiet=True))
            runs[task] = out
        return runs[task]

    return run


# Each task and each strategy, though not every combination: two processes per run are slow on 2 cores.
@pytest.mark.parametrize("task,launcher,strategy", [("sequence-classification", "torchrun", "ddp"),
                                                    ("causal-lm", "--nproc", "ddp"),
                                                    ("seq2seq", "torchrun", "ddp"),
                                                    ("token-classification", "torchrun", "ddp"),
                                                    ("sequence-classification", "torchrun", "fsdp"),
                                                    ("causal-lm", "torchrun", "fsdp")])
def test_two_ranks_equal_one_process_with_twice_the_batch(task, launcher, strategy, single_runs, tiny_models,
                                                          lm_model_dirs, task_models, toy_data, tmp_path):
    accum = ACCUM[task]
    out = tmp_path / strategy
    recipe = task_recipe(task, tiny_models, lm_model_dirs, task_models, toy_data, tmp_path, out, batch_size=4,
                         grad_accum_steps=accum, distributed=strategy)
    done = lorafit_train(write_recipe(tmp_path / "r.yaml", recipe), nproc=2, launcher=launcher)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(single_runs(task), out)
    assert f"2 processes ({strategy}), global batch {8 * accum}" in done.stdout
    steps = [m["step"] for m in read_metrics(out) if "split" not in m]
    assert steps == list(range(1, 2 * -(-3 // accum) + 1))  # 3 global batches per epoch, 2 epochs
    evaluated = [m for m in read_metrics(out) if m.get("split") == "eval"]
    assert evaluated and all(set(get_task(task).eval_metrics) <= m.keys() for m in evaluated)


def test_fsdp_equals_ddp_with_dropout_on(tiny_models, toy_data, tmp_path):
    """With LoRA dropout on, 2 FSDP ranks make DDP's updates (1e-5): each rank draws the same masks
    under either strategy. Only the unpadded encoder, on under DDP and off under FSDP, would change
    the draws (its masks cover the real tokens alone): gradient checkpointing turns it off on both
    sides (non-reentrant checkpointing replays the forward's random state)."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = runs[strategy] = tmp_path / strategy
        recipe = toy_recipe(tiny_models["bert"], toy_data, out, lora={"dropout": 0.1},
                            train={"max_steps": 6, "batch_size": 4, "precision": "fp32", "log_every": 1,
                                   "eval_every": None, "save_every": None, "distributed": strategy,
                                   "gradient_checkpointing": True})
        done = lorafit_train(write_recipe(tmp_path / f"{strategy}.yaml", recipe), nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "unpadded encoder" not in done.stdout and "fast dropout" in done.stdout
    assert_same_run(runs["ddp"], runs["fsdp"])


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


def logged_steps(out: Path) -> list[int]:
    """The training steps in out/metrics.jsonl so far (a line still being written left out)."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return [m["step"] for m in map(json.loads, (line for line in lines if line.endswith("}"))) if "split" not in m]


# The step the whole job is killed at is drawn from a fixed seed, named in the test id: a failure
# replays with the same step.
@pytest.mark.parametrize("kill_seed", [3], ids=lambda seed: f"kill_seed={seed}")
def test_killed_rank_then_killed_job_and_resume_gives_the_uninterrupted_run(kill_seed, ddp_reference, tiny_models,
                                                                            toy_data, tmp_path):
    """Two crashes of one run, each resumed (one launch serves both checks): a rank killed alone makes
    the job exit non-zero within a time limit, its last checkpoint intact; then the resumed job is
    killed whole (SIGKILL to every process, as when a machine fails) at a random, seeded step. Resumed
    again, the run logs every step once, with the uninterrupted run's losses, and ends with its adapter."""
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

    # Past any step the dead run may have logged after its last checkpoint, which the resumed run
    # drops from the log once it has loaded the model.
    kill_after = random.Random(kill_seed).randint(int(last.name.removeprefix("step-")) + 3, STEPS - 4)
    where = f"kill_seed={kill_seed}: the job killed whole once step {kill_after} was logged"
    job = start_ddp_run(recipe, "--resume")
    deadline = time.monotonic() + 120
    while not any(step >= kill_after for step in logged_steps(out)):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill_all()
            pytest.fail(f"{where}, but the run ended or hung first: {job.communicate()[1][-3000:]}")
        time.sleep(0.005)
    job.kill_all()
    job.finish(timeout=30)
    assert job.returncode == -signal.SIGKILL and job.processes() == [], where
    assert not (out / "adapter").exists()
    where += f" (the last step it logged: {max(logged_steps(out))})"

    resumed = lorafit_train(recipe, "--resume", nproc=2)
    assert resumed.returncode == 0, f"{where}; resume failed: {resumed.stderr[-3000:]}"
    assert logged_steps(out) == list(range(1, STEPS + 1)), where  # each step once: no line of a dead run kept
    expected = {m["step"]: m["loss"] for m in read_metrics(ddp_reference) if "split" not in m}
    got = {m["step"]: m["loss"] for m in read_metrics(out) if "split" not in m}
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"{where}; loss of step {step}"
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ddp_reference, out))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{where}; {key}: {m}")


def assert_stopped_together(job: Job, stderr: str, out: Path, workers: dict[int, int]) -> int:
    """The ranks of `job` (`workers`), sent SIGTERM, agreed to stop after the same step, rank 0 saved
    that step's checkpoint, and every rank is gone. Returns the step."""
    assert job.returncode != 0
    stopped_at = max(m["step"] for m in read_metrics(out) if "split" not in m)
    assert f"interrupted by signal 15 after step {stopped_at}" in " ".join(stderr.split())
    assert list_checkpoints(out)[-1].name == f"step-{stopped_at}"  # rank 0 saved the step all ranks stopped after
    for pid in workers.values():  # every rank is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    return stopped_at


def test_sigterm_to_the_launcher_checkpoints_and_every_rank_exits(tiny_models, toy_data, tmp_path):
    """SIGTERM to torchrun, which passes it to every rank (SIGTERM to one rank alone: the FSDP test
    below)."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(tiny_models, toy_data, out))
    job = start_ddp_run(recipe)
    wait_for_checkpoint(job, out, 2)
    workers = worker_pids(job.pid)
    os.kill(job.pid, signal.SIGTERM)
    assert_stopped_together(job, job.finish(timeout=120).stderr, out, workers)


def test_fsdp_stopped_and_resumed_equals_the_uninterrupted_run(tiny_models, toy_data, tmp_path):
    """FSDP checkpoints gather the adapter and the optimizer's state from the shards: stopped by
    SIGTERM to rank 1 alone after a checkpoint (all ranks stop after the same step and exit, rank 0
    checkpoints it) and resumed, an FSDP run ends as the uninterrupted one does."""
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
    workers = worker_pids(job.pid)
    os.kill(workers[1], signal.SIGTERM)  # to one rank alone: the other learns of it in the next step's all-reduce
    assert assert_stopped_together(job, job.finish(timeout=120).stderr, out, workers) < 12
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
