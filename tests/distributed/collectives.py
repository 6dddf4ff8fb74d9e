"""Run under `torchrun --nproc-per-node 2`: exercises lorafit.distributed's collectives and writes
what each rank saw to OUT_DIR/rank-<r>.json (tests/test_distributed.py asserts on it).

Usage: collectives.py OUT_DIR [timeout]
  (no mode)  every collective, with the process group's timeout at 30 s;
  timeout    each rank writes its pid to OUT_DIR/rank-<r>.pid; rank 1 never joins rank 0's all-reduce;
             rank 0 records how long it waited (timeout 3 s); then both hang, for the test harness to kill.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from lorafit.data import batch_order
from lorafit.distributed import (end_process_group, eval_share, gather_objects, merge_rows, on_main, rank_batches,
                                 rank_device, start_process_group, sum_over_ranks, world_from_env)
from lorafit.errors import LorafitError


def collectives(world, device) -> dict:
    seen: dict = {"rank": world.rank, "size": world.size, "local_rank": world.local_rank,
                  "launched": world.launched, "threads": torch.get_num_threads(), "device": str(device)}
    # 9 examples, batch 2 per rank: global batches of 4, the last one holds a single example.
    lengths = [3, 9, 1, 7, 5, 5, 2, 8, 4]
    seen["batches"] = {epoch: rank_batches(lengths, 2, 7, epoch, True, world) for epoch in (0, 1)}
    seen["global_batches"] = {epoch: batch_order(lengths, 4, 7, epoch, True) for epoch in (0, 1)}
    # A NaN on rank 1 only: every rank must see a non-finite sum.
    sums = sum_over_ranks([world.rank + 1.0, math.nan if world.rank == 1 else 0.0, 2.0 ** 53], device)
    seen["sums"] = [sums[0], math.isfinite(sums[1]), sums[2]]
    # 7 examples (not a multiple of 2): per-example outputs 10·i (and a 2-column one) come back in order.
    share = eval_share([4, 1, 6, 6, 2, 9, 3], world)
    outputs = {"score": torch.tensor([10.0 * i for i in share]),
               "pair": torch.tensor([[i, -i] for i in share], dtype=torch.long)}
    merged = merge_rows(gather_objects((share, outputs), world), 7)
    seen["eval_share"] = share
    seen["gathered"] = {k: v.tolist() for k, v in merged.items()}
    seen["objects"] = gather_objects({"rank": world.rank}, world)
    seen["on_main"] = on_main(world, lambda: f"written by rank {world.rank}")

    def fail():
        raise ValueError("disk full")

    try:
        on_main(world, fail)
        seen["on_main_failure"] = None
    except (ValueError, LorafitError) as err:
        seen["on_main_failure"] = f"{type(err).__name__}: {err}"
    return seen


def main() -> None:
    out, mode = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "all")
    world = world_from_env()
    device = rank_device(world, "cpu")
    start_process_group(world, device, timeout_s=3 if mode == "timeout" else 30)
    try:
        if mode == "timeout":
            (out / f"rank-{world.rank}.pid").write_text(str(os.getpid()))
            seen = {"rank": world.rank}
            if world.rank == 0:
                began = time.monotonic()
                try:
                    sum_over_ranks([1.0], device)
                    seen["error"] = None
                except Exception as err:  # noqa: BLE001 - the test reads what was raised
                    seen["error"] = type(err).__name__
                seen["waited_s"] = time.monotonic() - began
                (out / "rank-0.part").write_text(json.dumps(seen))
                (out / "rank-0.part").rename(out / "rank-0.json")  # whole when the test sees it
            time.sleep(600)  # alive but absent from any collective: a hung rank
            return
        seen = collectives(world, device)
        (out / f"rank-{world.rank}.json").write_text(json.dumps(seen))
    finally:
        if mode != "timeout":
            end_process_group()


if __name__ == "__main__":
    main()
