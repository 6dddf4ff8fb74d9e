"""Several processes under torchrun: the process group, each rank's device and share of the work,
and the collectives that make N ranks take the step one process with N times the batch would take.

Plain functions over a `World` (this process's place in the job). Outside torchrun the world is
`SINGLE` and every function here is a no-op or the identity, so the training loop calls them
unconditionally.

How the ranks stay in step:
- batches: every rank draws the same global batch order (`data.batch_order` with the global batch
  size) and takes its own contiguous share of each global batch (`rank_share`), so all ranks run
  the same number of micro-batches and steps, and together they see exactly what one process sees;
- loss: each rank's summed loss is divided by the global count of targets (`sum_over_ranks`), so the
  summed gradients are the gradients of the global mean;
- decisions (skip a non-finite step, stop on a signal) come from values reduced over all ranks,
  so every rank decides the same;
- writing: rank 0 alone writes files (`on_main`); the others wait in a collective that also carries
  rank 0's failure, so no rank waits on one that has given up.
"""

from __future__ import annotations

import datetime
import io
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lorafit.data import batch_order
from lorafit.errors import LorafitError

T = TypeVar("T")

# The variables torchrun sets for every worker (any launcher that sets them works the same).
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place in the job: its global `rank` of `size`, and its `local_rank` of the
    `local_size` processes on this machine. `launched`: started by torchrun (even with size 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launched: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


SINGLE = World()


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The world torchrun describes in `env`, or `SINGLE` when not under torchrun."""
    if not all(name in env for name in LAUNCH_VARIABLES[:3]):
        return SINGLE
    size = int(env["WORLD_SIZE"])
    return World(rank=int(env["RANK"]), size=size, local_rank=int(env["LOCAL_RANK"]),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", size)), launched=True)


def resolve_strategy(setting: str | None, world: World) -> str | None:
    """The recipe's `train.distributed` for this process: None (one process), "ddp" or "fsdp".
    Under torchrun null means ddp; outside torchrun a strategy is an error (there is no one to share with)."""
    if world.launched:
        return setting or "ddp"
    if setting is not None:
        raise LorafitError(f"train.distributed: {setting!r} needs several processes started by torchrun; launch "
                           f"with `lorafit train RECIPE --nproc N` or `torchrun --nproc-per-node N -m lorafit train "
                           f"RECIPE`, or set it to null to train in one process")
    return None


def available_devices(device_type: str) -> tuple[int, str]:
    """How many ranks this machine can hold, and what they are: its GPUs, or else its CPU cores."""
    if device_type == "cuda":
        return torch.cuda.device_count(), "GPUs"
    return len(os.sched_getaffinity(0)), "CPU cores"


def launch(nproc: int, args: list[str], device_type: str) -> NoReturn:
    """Replace this process by torchrun's launcher running `python -m lorafit ARGS` on `nproc` ranks
    of this machine (`lorafit train RECIPE --nproc N`). Signals to this process then reach the launcher,
    which passes them on to every rank."""
    count, kind = available_devices(device_type)
    if not 1 <= nproc <= count:
        raise LorafitError(f"--nproc {nproc}: this machine has {count} {kind}; use 1 to {count}")
    if world_from_env().launched:
        raise LorafitError("--nproc starts torchrun itself; under torchrun leave it out")
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", "-m", "lorafit", *args])


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks, the units FSDP shards one at a time: the items of its largest
    `ModuleList` (by parameters) whose items are all of one class. Empty when it has none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(item) for item in m}) == 1]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def check_strategy(strategy: str | None, model: torch.nn.Module, rank_schedule: dict | None = None) -> None:
    """Refuse a strategy the loaded model or the recipe cannot take: FSDP needs repeated blocks to
    shard; a rank schedule resizes LoRA factors that DDP and FSDP hold in fixed buffers."""
    if strategy and rank_schedule:
        raise LorafitError(f"lora.rank_schedule: not available with train.distributed: {strategy} (it resizes "
                           f"LoRA factors while the ranks share them); remove it or train in one process")
    if strategy == "fsdp" and not repeated_blocks(model):
        raise LorafitError(f"train.distributed: fsdp shards a model block by block, and {type(model).__name__} has "
                           f"no repeated blocks (no ModuleList of layers of one class); use ddp")


def active() -> bool:
    """Whether a process group is running (collectives below do nothing without one)."""
    return dist.is_available() and dist.is_initialized()


def cpu_share(world: World) -> int:
    """Threads for one rank on a CPU machine: the cores this process may use, split evenly among
    the ranks on this machine (at least one), so that ranks do not fight over cores."""
    return max(1, len(os.sched_getaffinity(0)) // world.local_size)


def rank_device(world: World, device_type: str) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` on GPUs, or the CPU, with `cpu_share` threads under
    torchrun (one process keeps torch's own thread count, or OMP_NUM_THREADS)."""
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise LorafitError(f"{world.local_size} processes on this machine but only {count} GPUs; "
                               f"start at most {count} (--nproc {count})")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    if world.launched:
        torch.set_num_threads(cpu_share(world))
    return torch.device("cpu")


def start_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Start the process group for `world`: nccl on GPUs, gloo on CPUs. A collective that waits
    longer than `timeout_s` (a rank died or hangs) fails instead of waiting for ever."""
    if not world.launched or active():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def end_process_group() -> None:
    """End the process group (at the end of a run, or when it fails)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


# ---------------------------------------------------------------- the work each rank does


def rank_share(items: list[T], world: World) -> list[T]:
    """This rank's contiguous share of `items`: ranks in order, sizes differing by at most one, so the
    shares of all ranks are disjoint and cover `items`. Empty when there are fewer items than ranks."""
    n = len(items)
    return items[world.rank * n // world.size:(world.rank + 1) * n // world.size]


def rank_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                 world: World) -> list[list[int]]:
    """This rank's micro-batches of one epoch: its `rank_share` of every batch of the global order
    (`data.batch_order` with batch `batch_size × world.size`). Every rank gets as many batches as
    the global order has; a share may be empty in the epoch's last, short batch."""
    batches = batch_order(lengths, batch_size * world.size, seed, epoch, group_by_length)
    return [rank_share(batch, world) for batch in batches]


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """`values` summed element-wise over all ranks (in float64: counts stay exact). A NaN or inf on
    any rank makes the sum non-finite on every rank, so decisions taken on it agree."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj` (tensors, numbers, strings, and lists, tuples and dicts of them), in rank
    order, on every rank. Sent as `torch.save` bytes (all_gather_object's own pickling of tensors
    fails to load some, e.g. the RNG state), read back with `weights_only=True`."""
    if not active():
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def on_main(world: World, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on rank 0 alone while the other ranks wait; every rank returns its result.

    If `fn` fails on rank 0, it raises there and the other ranks raise a `LorafitError` naming the
    failure, at once: the waiting collective carries the outcome, so no rank waits on a rank that
    has given up.
    """
    if not active():
        return fn(*args, **kwargs)
    outcome: list[Any] = [None, None]  # (result, error message)
    error: BaseException | None = None
    if world.main:
        try:
            outcome[0] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others learned of it
            error = err
            outcome = [None, f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise LorafitError(f"rank 0 failed, so rank {world.rank} stops too: {outcome[1]}")
    return outcome[0]


# ---------------------------------------------------------------- DDP


class LossForward(torch.nn.Module):
    """`loss(model, batch)` as a module's forward. DDP prepares its gradient reduction in its own
    forward, so the whole loss must run inside it: a loss that calls parts of the model (the
    causal-LM body, then the head at labelled positions) would otherwise bypass DDP, and its
    gradients would stay unsynchronized."""

    def __init__(self, model: torch.nn.Module, loss: Callable[[torch.nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.model, batch)


def wrap_ddp(model: torch.nn.Module, loss: Callable[[torch.nn.Module, dict], torch.Tensor],
             device: torch.device) -> DistributedDataParallel:
    """DDP over `loss` on `model`: calling the result with a batch returns `loss(model, batch)`, and
    its backward averages the gradients of the trainable parameters over the ranks.

    Only trainable parameters (LoRA factors, modules trained in full) go into gradient buckets or
    the start-up broadcast from rank 0; the frozen base and the buffers are left out of both (every
    rank loaded them from the same files). `model` itself is not copied: its parameters are the
    ones DDP synchronizes, so it can be evaluated and saved as it is.
    """
    wrapped = LossForward(model, loss)
    ignored = [name for name, p in wrapped.named_parameters() if not p.requires_grad]
    ignored += [name for name, _ in wrapped.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapped, ignored)
    return DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, gradient_as_bucket_view=True)


def shard_fsdp(model: torch.nn.Module, loss: Callable[[torch.nn.Module, dict], torch.Tensor],
               world: World) -> FSDPModule:
    """FSDP2 over `loss` on `model`: each of its `repeated_blocks` is sharded over the ranks (frozen
    weights and LoRA factors alike: FSDP2 shards parameter by parameter), then the rest, at the root
    (`LossForward`), whose forward gathers what the loss reads outside the blocks. `model`'s
    parameters become shards (DTensors); `full_parameters` gathers them back for saving."""
    mesh = init_device_mesh(next(model.parameters()).device.type, (world.size,))
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    return fully_shard(LossForward(model, loss), mesh=mesh)


@contextmanager
def accumulating(wrapped: torch.nn.Module):
    """Around a micro-batch's forward and backward that is not the step's last: its gradients add up
    on each rank, to be synchronized once, in the last micro-batch's backward (DDP's `no_sync`)."""
    if isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


@contextmanager
def root_gathered(wrapped: torch.nn.Module):
    """Inside, the model under an FSDP root (`shard_fsdp`) can be called directly, not through the
    root's forward (to evaluate it): the root's own parameters (embeddings, head, final norm) are
    gathered; each block still gathers its own in its forward. Without FSDP, nothing changes."""
    if not isinstance(wrapped, FSDPModule):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


@contextmanager
def full_parameters(model: torch.nn.Module, names: Callable[[str, torch.nn.Parameter], bool]):
    """Inside, `model`'s parameters that `names(name, param)` selects are whole tensors on every rank
    (FSDP keeps shards): gathered on entry (a collective: every rank must enter), put back on exit.
    Without FSDP, nothing changes. Used to save an adapter from a sharded model: every rank gathers
    the (small) trainable tensors, rank 0 writes them."""
    swapped = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor) and names(f"{module_name}.{name}".lstrip("."), param):
                module._parameters[name] = torch.nn.Parameter(param.full_tensor(), param.requires_grad)
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state for a checkpoint: under FSDP gathered to full tensors (a collective:
    every rank calls it; rank 0 gets the state), else `optimizer.state_dict()`."""
    if not isinstance(wrapped, FSDPModule):
        return optimizer.state_dict()
    return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def load_optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore what `optimizer_state` saved (under FSDP, each rank keeps its shard of it)."""
    if not isinstance(wrapped, FSDPModule):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------- evaluation


def eval_share(lengths: list[int], world: World) -> list[int]:
    """The examples (indices) this rank evaluates: every `world.size`-th of the split sorted by length,
    so ranks get about the same number of tokens; together the shares cover the split exactly once,
    whatever its size."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return order[world.rank::world.size]


def evaluate_shared(task, model: torch.nn.Module, split, batch_size: int, pad_id: int, device: torch.device,
             autocast: Callable, world: World) -> dict[str, float]:
    """`task.evaluate` on `split`, shared by the ranks: each evaluates its `eval_share`, and the shares
    are reduced to the metrics of the whole split (`Task.reduce_eval`). A task that evaluates whole
    splits only is run on all of it by every rank: the same metrics, without the speed-up."""
    if world.size > 1:
        share = task.evaluate_share(model, split, eval_share(split.lengths, world), batch_size, pad_id, device,
                                    autocast)
        if share is not None:
            return task.reduce_eval(split, gather_objects(share, world))
    return task.evaluate(model, split, batch_size, pad_id, device, autocast)


def check_cover(shares: list[list[int]], n: int) -> None:
    """Raise unless the shares' example indices cover the `n` examples of a split exactly once: an
    example evaluated by no rank, or by two, would change the metrics."""
    seen = torch.zeros(n, dtype=torch.long)
    for indices in shares:
        rows = torch.tensor(indices, dtype=torch.long)
        seen.index_add_(0, rows, torch.ones_like(rows))
    if not bool((seen == 1).all()):
        raise RuntimeError(f"sharded evaluation covered {int((seen == 0).sum())} examples never and "
                           f"{int((seen > 1).sum())} more than once")


def merge_rows(parts: list[tuple[list[int], dict[str, torch.Tensor]]], n: int) -> dict[str, torch.Tensor]:
    """Per-example outputs of all ranks (`gather_objects` of each rank's `(indices, outputs)`, where
    `outputs[name]` holds one row per example of `indices`), as `n` rows in the split's order.
    Shares that do not cover the split exactly once are an error (`check_cover`)."""
    check_cover([indices for indices, _ in parts], n)
    merged: dict[str, torch.Tensor] = {}
    for indices, outputs in parts:
        rows = torch.tensor(indices, dtype=torch.long)
        for name, values in outputs.items():
            if name not in merged:
                merged[name] = values.new_zeros((n, *values.shape[1:]))
            merged[name][rows] = values.cpu()
    return merged


def merge_items(parts: list[tuple[list[int], list[T]]], n: int) -> list[T]:
    """`merge_rows` for per-example values that are not tensors (texts, lists of tags): each rank's
    `(indices, items)`, one item per index, as `n` items in the split's order."""
    check_cover([indices for indices, _ in parts], n)
    merged: list[Any] = [None] * n
    for indices, items in parts:
        if len(items) != len(indices):
            raise RuntimeError(f"a share of sharded evaluation has {len(items)} items for {len(indices)} examples")
        for i, item in zip(indices, items):
            merged[i] = item
    return merged
