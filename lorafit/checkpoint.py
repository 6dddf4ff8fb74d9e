"""Checkpoints: a complete adapter plus everything needed to resume training exactly.

`checkpoints/step-<N>/` holds the adapter files, `training_state.pt` (optimizer, scheduler, loop
position and every RNG state; plain tensors and Python values, read with
`torch.load(weights_only=True)`) and `trainer_state.json` (the same position, for people).
Each is written to a temporary directory and renamed into place, so a directory named
`step-<N>` is always complete.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.adapter import CONFIG_FILE, META_FILE, WEIGHTS_FILE, write_adapter_files
from lorafit.errors import LorafitError
from lorafit.io import atomic_directory, read_json, write_json

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"step-(\d+)")
# Recipe keys a resumed run may change: they do not alter the optimisation trajectory.
RESUME_SAFE = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
               "train.output_dir", "train.eval_batch_size", "train.loggers", "data.max_eval_samples",
               "data.test_split", "train.skip_nonfinite", "data.cache", "train.gradient_checkpointing",
               "train.compile", "train.eval_splits", "train.pad_to_multiple_of",
               "train.collective_timeout_s"}


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].copy())
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy()
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model, plan, spec, optimizer, scheduler, progress: dict[str, Any],
                    rng_states: list[dict[str, Any]] | None = None, optimizer_state: dict | None = None) -> Path:
    """Write adapter + training state atomically. `progress` holds the loop position (step, epoch, ...);
    `rng_states` every rank's `rng_state()` in rank order (default: this one process's), whose
    number is the run's world size; `optimizer_state` the optimizer's state when it is not
    `optimizer.state_dict()` (gathered from FSDP's shards)."""
    rng_states = rng_states or [rng_state()]
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, model, plan, spec)
        torch.save({"optimizer": optimizer_state or optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "progress": progress, "rng": rng_states, "world_size": len(rng_states)}, tmp / STATE_FILE)
        write_json(tmp / "trainer_state.json", {**{k: progress[k] for k in ("step", "epoch", "batch_index")},
                                                "world_size": len(rng_states)})
    return Path(directory)


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE, STATE_FILE))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir/checkpoints`, oldest first (temporary directories never count)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (call only after a new one is complete)."""
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """`which` is "latest" (the newest complete checkpoint in output_dir) or a checkpoint directory."""
    if which != "latest":
        path = Path(which)
        if not path.is_dir():
            raise LorafitError(f"--resume: checkpoint directory not found: {path}")
        if not is_complete(path):
            raise LorafitError(f"--resume: {path} is not a complete checkpoint (it lacks {STATE_FILE} or adapter files)")
        return path
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise LorafitError(f"--resume: no complete checkpoint in {Path(output_dir) / 'checkpoints'}; "
                           f"start without --resume (add --overwrite to replace the run)")
    return checkpoints[-1]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "data_files":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(checkpoint: Path, recipe: dict[str, Any]) -> None:
    """Refuse to resume when the recipe changed in a way that changes training (model, LoRA, data, ...)."""
    saved = read_json(checkpoint / META_FILE).get("recipe")
    if saved is None:
        raise LorafitError(f"--resume: {checkpoint} was not written by lorafit train (no recipe in {META_FILE})")
    before, now = _flatten(saved), _flatten(recipe)
    changed = [k for k in sorted(set(before) | set(now)) if k not in RESUME_SAFE and before.get(k) != now.get(k)]
    if changed:
        details = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed[:4])
        raise LorafitError(f"cannot resume from {checkpoint}: the recipe changed: {details}; "
                           f"restore those values or start a new run")


def check_world_size(state: dict[str, Any], checkpoint: Path, world_size: int) -> None:
    """Refuse to resume a checkpoint's training `state` on another number of processes than wrote it:
    the global batch, each rank's share of it and each rank's random stream all depend on it."""
    saved = state.get("world_size", 1)
    if saved != world_size:
        how = "in one process (no --nproc)" if saved == 1 else f"on {saved} processes (--nproc {saved})"
        raise LorafitError(f"cannot resume from {checkpoint}: it was written by {saved} process"
                           f"{'es' if saved > 1 else ''} and this run has {world_size}; resume it {how}")


def rank_rng_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank `rank`'s RNG state in a checkpoint's training `state` (see `check_world_size`)."""
    rng = state["rng"]
    return rng[rank] if isinstance(rng, list) else rng  # a dict: written before checkpoints held every rank's


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state file means the same to the user
        raise LorafitError(f"{checkpoint / STATE_FILE}: cannot read the training state ({err})") from None
