"""lorafit.distributed: unit checks in one process, and its collectives under torchrun with two
CPU ranks on gloo (tests/distributed/*.py run as torchrun's workers and write what they saw)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.distributed import SINGLE, World, eval_share, rank_batches, rank_share, world_from_env

SCRIPTS = Path(__file__).parent / "distributed"
REPO = Path(__file__).parent.parent


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run tests/distributed/SCRIPT as `torchrun --standalone --nproc-per-node NPROC` workers."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(SCRIPTS / script), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


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


def test_a_hung_rank_times_out(tmp_path):
    done = torchrun("collectives.py", str(tmp_path), "timeout")
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "rank-0.json").read_text())
    assert seen["error"] is not None
    assert seen["waited_s"] < 10  # the process group's timeout is 3 s; without one it would wait for ever
