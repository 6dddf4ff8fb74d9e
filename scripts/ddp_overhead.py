"""What DDP costs on one CPU machine: scripts/bench.py's newsgroups throughput job (MiniLM, LoRA on
query/value, global batch 16, lorafit's defaults) as one process using every core against
`--nproc` ranks under torchrun with DDP, each on its share of the cores (lorafit gives a rank
cores / ranks threads), with the same global batch (16 / nproc per rank). On one machine the
ranks share the cores that the single process has to itself, so the ratio shows DDP's overhead
(gradient all-reduce over gloo, the all-reduced counts and flags, smaller matmuls per rank), not
a speed-up. A third side runs what one rank does, alone: one process on one rank's share of the
cores with one rank's batch; N of those, with no communication and no sharing of the cores, are
the ceiling DDP's ranks could reach. The sides alternate round by round; reported: steady-state
samples/s and tokens/s per side (medians), DDP against the single process and against that
ceiling (per round, and the median), and the bytes DDP all-reduces per optimizer step: the
gradient buckets (read from DDP's own logging data after the run; every bucket is all-reduced
once per step, since every trainable parameter gets a gradient).

    python scripts/ddp_overhead.py --steps 40 --warmup 8 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: bench's job and measurement
from bench import JOBS, ROOT, steady_throughput, throughput_overrides  # noqa: E402

TASK = "newsgroups"


def worker(steps: int, warmup: int, batch_size: int, out: Path) -> None:
    """Train the throughput job into `out`/run in this process (alone, or one rank of a torchrun job);
    rank 0 writes its throughput and the DDP gradient buckets to `out`/result.json."""
    from rich.console import Console

    import lorafit.train
    from lorafit.recipe import load_recipe

    wrapped = []
    wrap_ddp = lorafit.train.wrap_ddp

    def keep(*args, **kwargs):  # the DDP module, to read its bucket sizes after training
        wrapped.append(wrap_ddp(*args, **kwargs))
        return wrapped[-1]

    lorafit.train.wrap_ddp = keep
    recipe = load_recipe(ROOT / JOBS[TASK].recipe,
                         [*throughput_overrides(TASK, steps, batch_size), f"train.output_dir={out / 'run'}"])
    lorafit.train.train(recipe, console=Console(file=io.StringIO(), width=1000))
    if os.environ.get("RANK", "0") != "0":  # rank 0 alone writes metrics
        return
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s, samples_per_s = steady_throughput(lines, warmup, batch_size * int(os.environ.get("WORLD_SIZE", 1)))
    buckets = [int(b) for b in wrapped[0]._get_ddp_logging_data()["bucket_sizes"].split(",")] if wrapped else []
    (out / "result.json").write_text(json.dumps({"tokens_per_s": tokens_per_s, "samples_per_s": samples_per_s,
                                                 "bucket_bytes": buckets}))


def run(nproc: int, threads: int | None, batch_size: int, steps: int, warmup: int) -> dict:
    """One measurement in fresh processes: one process (nproc 1; `threads` threads, None: lorafit's
    choice) or `nproc` torchrun ranks, each with `batch_size` examples a step."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--worker", "--steps", str(steps), "--warmup", str(warmup), "--out", tmp,
                "--batch-size", str(batch_size)]
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("OMP_NUM_THREADS", None)  # lorafit picks threads: every core alone, a share per rank
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        done = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import transformers

        transformers.logging.set_verbosity_error()
        worker(args.steps, args.warmup, args.batch_size, args.out)
        return
    if JOBS[TASK].batch_size % args.nproc:
        raise SystemExit(f"--nproc must divide the job's batch of {JOBS[TASK].batch_size}")
    batch, share = JOBS[TASK].batch_size, JOBS[TASK].batch_size // args.nproc
    from lorafit.distributed import World, cpu_share

    threads = cpu_share(World(local_size=args.nproc))  # what lorafit gives each rank
    sides = {"single": ("1 process", 1, None, batch), "ddp": (f"{args.nproc} ranks DDP", args.nproc, None, share),
             "rank": (f"1 rank alone ({threads} thread(s), batch {share})", 1, threads, share)}
    results: dict[str, list[dict]] = {key: [] for key in sides}
    for round_ in range(args.rounds):
        for key, (name, nproc, side_threads, side_batch) in sides.items():
            r = run(nproc, side_threads, side_batch, args.steps, args.warmup)
            results[key].append(r)
            print(f"round {round_ + 1} {name:34s} {r['samples_per_s']:6.2f} samples/s {r['tokens_per_s']:8.1f} tok/s",
                  flush=True)
    print(f"\n{TASK}, global batch {batch}, {args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds; medians:")
    for key, (name, *_) in sides.items():
        runs = results[key]
        print(f"{name:34s} {statistics.median(r['samples_per_s'] for r in runs):6.2f} samples/s "
              f"{statistics.median(r['tokens_per_s'] for r in runs):8.1f} tok/s")
    # Tokens/s: a rank alone groups its batches of `share` by length itself, so its samples differ.
    against_single = [d["tokens_per_s"] / s["tokens_per_s"] for s, d in zip(results["single"], results["ddp"])]
    against_ceiling = [d["tokens_per_s"] / (args.nproc * r["tokens_per_s"]) for r, d in zip(results["rank"], results["ddp"])]
    for label, ratios in (("DDP / 1 process", against_single), (f"DDP / ({args.nproc} x 1 rank alone)", against_ceiling)):
        print(f"{label}: {statistics.median(ratios):.2f}x in tokens/s (per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    buckets = results["ddp"][0]["bucket_bytes"]
    print(f"all-reduced per optimizer step: {sum(buckets):,} bytes of gradients in {len(buckets)} bucket(s)")


if __name__ == "__main__":
    main()
