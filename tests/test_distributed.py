"""lorafit.distributed: unit checks in one process, and its collectives under torchrun with two
CPU ranks on gloo (tests/distributed/*.py run as torchrun's workers and write what they saw)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import KEYWORDS, Job, run_job, toy_recipe, write_recipe

from lorafit.distributed import (SINGLE, World, check_strategy, eval_share, merge_items, merge_rows, rank_batches,
                                 rank_share, repeated_blocks, world_from_env)
from lorafit.errors import LorafitError

SCRIPTS = Path(__file__).parent / "distributed"
REPO = Path(__file__).parent.parent


def torchrun_command(script: str, *args: str, nproc: int = 2) -> list[str]:
    """tests/distributed/SCRIPT as `torchrun --standalone --nproc-per-node NPROC` workers."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(SCRIPTS / script), *args]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run tests/distributed/SCRIPT as `torchrun --standalone --nproc-per-node NPROC` workers (a `Job`).

    `timeout` only catches a hang: a run takes about 6 s on an idle 2-core machine, and took more than
    60 s in CI beside the other test pass and a training job (its two ranks and imports share two cores)."""
    return run_job(torchrun_command(script, *args, nproc=nproc), torchrun_env(), timeout, cwd=REPO)


def read_ranks(directory: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((directory / f"rank-{r}.json").read_text()) for r in range(nproc)]


# ---------------------------------------------------------------- one process


def test_world_from_env():
    assert world_from_env({}) == SINGLE
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert world_from_env(env) == World(rank=3, size=4, local_rank=1, local_size=2, launched=True)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8, 9])
def test_rank_shares_cover_each_item_once(n):
    items = list(range(n))
    shares = [rank_share(items, World(rank=r, size=3)) for r in range(3)]
    assert [i for share in shares for i in share] == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    evals = [eval_share(list(range(n, 0, -1)), World(rank=r, size=3)) for r in range(3)]
    assert sorted(i for share in evals for i in share) == items


def test_single_process_batches_are_the_batch_order():
    from lorafit.data import batch_order

    lengths = [3, 9, 1, 7, 5]
    assert rank_batches(lengths, 2, 1, 0, True, SINGLE) == batch_order(lengths, 2, 1, 0, True)


def test_merge_rows_refuses_gaps_and_overlaps():
    rows = {"x": torch.tensor([1.0, 2.0])}
    assert merge_rows([([2, 0], rows), ([1], {"x": torch.tensor([5.0])})], 3)["x"].tolist() == [2.0, 5.0, 1.0]
    with pytest.raises(RuntimeError, match="covered 1 examples never and 0 more than once"):
        merge_rows([([2, 0], rows)], 3)
    with pytest.raises(RuntimeError, match="covered 0 examples never and 1 more than once"):
        merge_rows([([1, 0], rows), ([1], {"x": torch.tensor([5.0])})], 2)
    assert merge_items([([2, 0], ["c", "a"]), ([1], [["b"]])], 3) == ["a", ["b"], "c"]
    with pytest.raises(RuntimeError, match="covered 1 examples never and 1 more than once"):
        merge_items([([2, 0], ["c", "a"]), ([2], ["b"])], 3)
    with pytest.raises(RuntimeError, match="has 1 items for 2 examples"):
        merge_items([([1, 0], ["b"])], 2)


# ---------------------------------------------------------------- sharded evaluation, in one process


def task_splits(tiny_models) -> dict:
    """Per task: a tiny model, a tokenized split of 7 examples (no multiple of 2 or 3) and its pad id."""
    import random

    from conftest import WORDS, lm_tokenizer, make_tokenizer, tiny_lm, toy_rows
    from test_seq2seq import make_tokenizer as s2s_tokenizer
    from test_seq2seq import pairs, tiny_model
    from test_token_classification import tiny_tagger, toy_sentences
    from transformers import AutoModelForSequenceClassification

    from lorafit.data import TextSplit
    from lorafit.lm import tokenize_lm
    from lorafit.recipe import DataConfig
    from lorafit.tasks.classification import tokenize
    from lorafit.tasks.seq2seq import Seq2Seq, score_split
    from lorafit.tasks.token_classification import TaggedSentences, tokenize_sentences

    rows = toy_rows(7, seed=5)
    names = sorted(KEYWORDS)
    classification = tokenize(TextSplit([r["text"] for r in rows], [names.index(r["label"]) for r in rows]),
                              make_tokenizer(), 32)
    rng = random.Random(5)
    lm_examples = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
                    "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))} for _ in range(7)]
    translations = [{"source": r["en"], "target": r["de"]} for r in pairs(7, seed=5)]
    sentences = toy_sentences(7, seed=5)
    tags = sorted({t for s in sentences for t in s["ner_tags"]})
    tagged = TaggedSentences([s["tokens"] for s in sentences], [[tags.index(t) for t in s["ner_tags"]]
                                                                 for s in sentences], tags)
    translator = tiny_model("bart")
    s2s = Seq2Seq().tokenize(translations, s2s_tokenizer(), DataConfig(cache=False, max_target_length=6), 8)
    _, greedy = score_split(translator, s2s, 2, 0)
    # Every other reference is the model's own translation: BLEU above 0, and it changes if one moves.
    s2s.references = [g if i % 2 else r for i, (g, r) in enumerate(zip(greedy, s2s.references))]
    return {
        "sequence-classification": (AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]),
                                    classification, 0),
        "causal-lm": (tiny_lm("llama"), tokenize_lm(lm_examples, lm_tokenizer(), 32, "prompt-completion"), 0),
        "seq2seq": (translator, s2s, 0),
        "token-classification": (tiny_tagger("bert", len(tags)), tokenize_sentences(tagged, make_tokenizer(), 32), 0),
    }


def test_sharded_evaluation_equals_the_whole_split(tiny_models):
    """For every task, the shares of 2 or 3 ranks (`eval_share`), each evaluated alone, sent as
    `gather_objects` sends them and reduced, give what `evaluate` gives on the whole split: loss (1e-6)
    and every other metric (BLEU on all translations, seqeval on all sentences), on a split of 7."""
    import io

    from lorafit.tasks import get_task

    def sent(share):  # through torch.save and a weights-only load, as gather_objects sends it
        buffer = io.BytesIO()
        torch.save(share, buffer)
        return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    for name, (model, split, pad_id) in task_splits(tiny_models).items():
        task = get_task(name)
        whole = task.evaluate(model, split, 2, pad_id)
        assert set(task.eval_metrics) <= set(whole), name
        for size in (2, 3):
            shares = [sent(task.evaluate_share(model, split, eval_share(split.lengths, World(rank=r, size=size)), 2,
                                               pad_id)) for r in range(size)]
            reduced = task.reduce_eval(split, shares)
            assert reduced == pytest.approx(whole, rel=1e-6, abs=1e-6), (name, size)
        if name == "seq2seq":
            assert whole["bleu"] > 10


# ---------------------------------------------------------------- bad input


def test_strategy_without_torchrun_is_refused(run_cli, tiny_models, toy_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", toy_recipe(tiny_models["bert"], toy_data, tmp_path / "run",
                                                           train={"distributed": "ddp"}))
    result = run_cli("train", recipe)
    assert result.exit_code == 2
    assert " ".join(result.stderr.split()) == (
        "error: train.distributed: 'ddp' needs several processes started by torchrun; launch with `lorafit train "
        "RECIPE --nproc N` or `torchrun --nproc-per-node N -m lorafit train RECIPE`, or set it to null to train in "
        "one process")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_nproc_above_the_devices_is_refused(run_cli, tiny_models, toy_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", toy_recipe(tiny_models["bert"], toy_data, tmp_path / "run"))
    cores = len(os.sched_getaffinity(0))
    result = run_cli("train", recipe, "--nproc", cores + 1)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --nproc {cores + 1}: this machine has {cores} CPU cores; use 1 to {cores}"


def test_fsdp_needs_repeated_blocks(tiny_models):
    from transformers import AutoModelForSequenceClassification

    for kind in ("bert", "gpt2", "llama"):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind])
        blocks = repeated_blocks(model)
        assert len(blocks) == 2 and len({type(b) for b in blocks}) == 1, kind  # the 2 layers of each
        check_strategy("fsdp", model)
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    check_strategy("ddp", flat)
    with pytest.raises(LorafitError) as err:
        check_strategy("fsdp", flat)
    assert str(err.value) == ("train.distributed: fsdp shards a model block by block, and Sequential has no repeated "
                              "blocks (no ModuleList of layers of one class); use ddp")


def test_resume_on_another_world_size_is_refused(tmp_path):
    from lorafit.checkpoint import check_world_size, rank_rng_state, rng_state

    state = {"rng": [rng_state(), rng_state()], "world_size": 2}
    check_world_size(state, tmp_path, 2)
    assert rank_rng_state(state, 1) is state["rng"][1]
    with pytest.raises(LorafitError) as err:
        check_world_size(state, tmp_path, 1)
    assert str(err.value) == (f"cannot resume from {tmp_path}: it was written by 2 processes and this run has 1; "
                              f"resume it on 2 processes (--nproc 2)")
    with pytest.raises(LorafitError) as err:
        check_world_size({"rng": rng_state()}, tmp_path, 2)  # a checkpoint from before world sizes were kept
    assert str(err.value).endswith("written by 1 process and this run has 2; resume it in one process (no --nproc)")


# ---------------------------------------------------------------- two ranks under torchrun


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("collectives")
    done = torchrun("collectives.py", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return read_ranks(out)


def test_ranks_know_their_place(two_ranks):
    assert [(r["rank"], r["size"], r["local_rank"], r["launched"]) for r in two_ranks] == [(0, 2, 0, True),
                                                                                        (1, 2, 1, True)]
    cores = len(os.sched_getaffinity(0))
    assert [r["threads"] for r in two_ranks] == [max(1, cores // 2)] * 2


def test_ranks_split_each_global_batch(two_ranks):
    for epoch in ("0", "1"):
        ours = [r["batches"][epoch] for r in two_ranks]
        expected = two_ranks[0]["global_batches"][epoch]
        assert len(ours[0]) == len(ours[1]) == len(expected)  # every rank runs the same number of steps
        assert [a + b for a, b in zip(*ours)] == expected  # disjoint, and together the global batch
    # The global batch of a single example leaves one rank an empty share.
    assert sum(share == [] for r in two_ranks for share in r["batches"]["0"]) == 1


def test_sums_and_nonfinite_agree(two_ranks):
    for r in two_ranks:
        assert r["sums"] == [3.0, False, 2.0 ** 54]


def test_sharded_outputs_come_back_in_order(two_ranks):
    assert sorted(two_ranks[0]["eval_share"] + two_ranks[1]["eval_share"]) == list(range(7))
    for r in two_ranks:
        assert r["gathered"]["score"] == [10.0 * i for i in range(7)]
        assert r["gathered"]["pair"] == [[i, -i] for i in range(7)]
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]


def test_main_runs_alone_and_its_failure_reaches_everyone(two_ranks):
    assert [r["on_main"] for r in two_ranks] == ["written by rank 0"] * 2
    assert two_ranks[0]["on_main_failure"] == "ValueError: disk full"
    assert two_ranks[1]["on_main_failure"] == ("LorafitError: rank 0 failed, so rank 1 stops too: "
                                               "ValueError: disk full")


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp-loss")
    done = torchrun("ddp_loss.py", str(out), "ddp-1", "ddp-2", "fsdp-2")
    assert done.returncode == 0, done.stderr[-3000:]
    return read_ranks(out)


@pytest.mark.parametrize("strategy,micro_batches", [("ddp", 1), ("ddp", 2), ("fsdp", 2)])
def test_sharing_ranks_give_the_gradients_of_one_process(one_step, strategy, micro_batches):
    """Causal LM on its chunked-head loss path: 2 ranks × half of each micro-batch give the gradients
    of one process on all of it, with or without accumulation (no gradient sync on all but the last);
    the adapter gathered from the ranks is the one process's, with no empty tensor."""
    for rank in one_step:
        seen = rank[f"{strategy}-{micro_batches}"]
        assert seen["chunked_loss"]  # the fast path runs, inside the wrapper's forward
        assert seen["targets"][0] == seen["targets"][1]  # the global count, on every rank
        assert seen["max_grad"] > 1e-3
        assert seen["max_grad_diff"] < 1e-6
        assert seen["adapter_keys"] and seen["adapter_diff"] == 0 and seen["adapter_empty"] == []
        if strategy == "ddp":
            assert seen["bucketed"] == seen["trainable"]  # the frozen base is in no gradient bucket
            syncs = seen["syncs_after_each_micro_batch"]  # gradients are all-reduced in the last backward only
            assert syncs[-1] > 0 and syncs[:-1] == [0] * (micro_batches - 1)
            assert seen["sharded"] == []
        else:  # each block is sharded on its own, then the root; frozen and LoRA weights alike are shards
            assert seen["fsdp_units"] == ["", "model.model.layers.0", "model.model.layers.1"]
            assert {"model.layers.0.self_attn.q_proj.base.weight",
                    "model.layers.1.mlp.down_proj.lora_B.weight"} <= set(seen["sharded"])


def test_a_hung_rank_times_out_and_the_hung_job_is_killed_whole(tmp_path):
    """Rank 1 never joins rank 0's all-reduce: rank 0 fails after the process group's timeout (3 s)
    instead of waiting for ever. Then both ranks hang: at its timeout the test harness (`Job`) kills
    the job whole, the ranks too (torchrun starts each in a session of its own, out of reach of the
    launcher's process group), and fails the test with the job's output."""
    job = Job(torchrun_command("collectives.py", str(tmp_path), "timeout"), torchrun_env(), cwd=REPO,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = [tmp_path / name for name in ("rank-0.pid", "rank-1.pid", "rank-0.json")]
    deadline = time.monotonic() + 120
    while not all(f.exists() for f in written):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill_all()
            pytest.fail(f"the ranks did not get to their hang: {job.communicate()[1][-3000:]}")
        time.sleep(0.05)
    seen = json.loads((tmp_path / "rank-0.json").read_text())
    assert seen["error"] is not None
    assert seen["waited_s"] < 10  # the process group's timeout is 3 s; without one it would wait for ever

    ranks = [int((tmp_path / f"rank-{r}.pid").read_text()) for r in range(2)]
    assert set(ranks) < set(job.processes())  # and the launcher
    with pytest.raises(pytest.fail.Exception, match=r"collectives.py .* timeout timed out after 0.5 s; killed its "):
        job.finish(timeout=0.5)
    for pid in [job.pid, *ranks]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
    assert job.processes() == []
