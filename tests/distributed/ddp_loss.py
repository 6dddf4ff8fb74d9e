"""Run under `torchrun --nproc-per-node 2`: one optimizer step's gradients under DDP or FSDP2, each
rank with half of every micro-batch and the loss over the global count of targets, against one
process with the whole batch; and the adapter tensors gathered from the ranks. Writes
OUT_DIR/rank-<r>.json, {"STRATEGY-MICRO_BATCHES": what the rank saw} for each setting
(tests/test_distributed.py asserts on it).

Usage: ddp_loss.py OUT_DIR STRATEGY-MICRO_BATCHES...   (e.g. ddp-1 ddp-2 fsdp-2)
"""

import copy
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import AutoModelForCausalLM, LlamaConfig

from lorafit.adapter import adapter_state_dict
from lorafit.distributed import (accumulating, end_process_group, full_parameters, rank_device, rank_share,
                                 shard_fsdp, start_process_group, sum_over_ranks, world_from_env, wrap_ddp)
from lorafit.lm import IGNORE, count_targets, lm_loss, loss_path
from lorafit.lora import LoraPlan, add_lora


def batch(seed: int, rows: int = 8, width: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded random rows of varied lengths, the first tokens of each unlabelled (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 40, (rows, width), generator=generator)
    lengths = torch.randint(4, width + 1, (rows,), generator=generator)
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :2] = IGNORE
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "labels": labels}


def one_step(strategy: str, n_micro: int, world, device) -> dict:
    """What a rank sees in one step with `n_micro` micro-batches under `strategy`, on a fresh model."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    plan: LoraPlan = add_lora(model, 4, 8, "all-linear")
    with torch.no_grad():  # lora_B starts at zero; random factors give every trainable tensor a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    reference = copy.deepcopy(model)
    micro = [batch(seed) for seed in range(n_micro)]

    # One process, the whole batch: the step's mean loss over all targets.
    total = sum(count_targets(b) for b in micro)
    (sum(lm_loss(reference, b) for b in micro) / total).backward()

    # Each rank its share of every micro-batch, divided by the global count; DDP and FSDP average
    # gradients over the ranks, so each rank's loss is scaled by the world size.
    loss_path(model)  # probed on the whole model, before sharding
    wrapped = wrap_ddp(model, lm_loss, device) if strategy == "ddp" else shard_fsdp(model, lm_loss, world)
    shares = [{k: v[rank_share(list(range(len(b["labels"]))), world)] for k, v in b.items()} for b in micro]
    (n_targets,) = sum_over_ranks([sum(count_targets(b) for b in shares)], device)
    syncs: list[int] = []  # DDP's gradient all-reduces, counted per bucket
    if strategy == "ddp":
        wrapped.register_comm_hook(syncs, lambda calls, bucket: calls.append(1) or allreduce_hook(None, bucket))
    syncs_after = []
    for i, share in enumerate(shares):
        with accumulating(wrapped) if i < len(shares) - 1 else nullcontext():
            (wrapped(share) * world.size / n_targets).backward()
        syncs_after.append(len(syncs))

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.full_tensor() if strategy == "fsdp" else p.grad for n, p in trainable.items()}
    expected = dict(reference.named_parameters())
    with full_parameters(model, lambda name, p: p.requires_grad):
        adapter = adapter_state_dict(model, plan)
    expected_adapter = adapter_state_dict(reference, plan)
    seen = {
        "chunked_loss": loss_path(model).body is not None,
        "targets": [n_targets, total],
        "max_grad_diff": max((g - expected[n].grad).abs().max().item() for n, g in grads.items()),
        "max_grad": max(g.abs().max().item() for g in grads.values()),
        "trainable": sorted(trainable),
        "syncs_after_each_micro_batch": syncs_after,
        "adapter_keys": sorted(adapter) == sorted(expected_adapter),
        "adapter_diff": max((adapter[k] - expected_adapter[k]).abs().max().item() for k in adapter),
        "adapter_empty": [k for k, v in adapter.items() if v.numel() == 0],
        "fsdp_units": sorted(n for n, m in wrapped.named_modules() if isinstance(m, FSDPModule)),
        "sharded": sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"),
    }
    if strategy == "ddp":
        seen["bucketed"] = sorted(n.removeprefix("module.model.") for n, p in wrapped.named_parameters()
                                  if p in set(wrapped._module_parameters))
    return seen


def main() -> None:
    out, settings = Path(sys.argv[1]), sys.argv[2:]
    world = world_from_env()
    device = rank_device(world, "cpu")
    start_process_group(world, device, timeout_s=60)
    seen = {}
    for setting in settings:  # one launch serves them all: starting two ranks costs more than a step
        strategy, n_micro = setting.split("-")
        seen[setting] = one_step(strategy, int(n_micro), world, device)
    (out / f"rank-{world.rank}.json").write_text(json.dumps(seen))
    end_process_group()


if __name__ == "__main__":
    main()
