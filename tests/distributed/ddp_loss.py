"""Run under `torchrun --nproc-per-node 2`: one optimizer step's gradients under DDP, each rank with
half of every micro-batch and the loss over the global count of targets, against one process with
the whole batch. Writes OUT_DIR/rank-<r>.json (tests/test_distributed.py asserts on it).

Usage: ddp_loss.py OUT_DIR MICRO_BATCHES
"""

import copy
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lorafit.distributed import rank_device, rank_share, start, stop, sum_over_ranks, world_from_env, wrap_ddp
from lorafit.lm import IGNORE, count_targets, lm_loss, loss_path
from lorafit.lora import add_lora


def batch(seed: int, rows: int = 8, width: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded random rows of varied lengths, the first tokens of each unlabelled (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 40, (rows, width), generator=generator)
    lengths = torch.randint(4, width + 1, (rows,), generator=generator)
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :2] = IGNORE
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "labels": labels}


def main() -> None:
    out, n_micro = Path(sys.argv[1]), int(sys.argv[2])
    world = world_from_env()
    device = rank_device(world, "cpu")
    start(world, device, timeout_s=60)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    add_lora(model, 4, 8, "all-linear")
    with torch.no_grad():  # lora_B starts at zero; random factors give every trainable tensor a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    reference = copy.deepcopy(model)
    micro = [batch(seed) for seed in range(n_micro)]

    # One process, the whole batch: the step's mean loss over all targets.
    total = sum(count_targets(b) for b in micro)
    (sum(lm_loss(reference, b) for b in micro) / total).backward()

    # DDP: each rank its share of every micro-batch, divided by the global count; DDP averages
    # gradients over the ranks, so each rank's loss is scaled by the world size.
    ddp = wrap_ddp(model, lm_loss, device)
    shares = [{k: v[rank_share(list(range(len(b["labels"]))), world)] for k, v in b.items()} for b in micro]
    (n_targets,) = sum_over_ranks([sum(count_targets(b) for b in shares)], device)
    for i, share in enumerate(shares):
        with ddp.no_sync() if i < len(shares) - 1 else nullcontext():
            (ddp(share) * world.size / n_targets).backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = dict(reference.named_parameters())
    seen = {
        "chunked_loss": loss_path(model).body is not None,
        "targets": [n_targets, total],
        "max_grad_diff": max((p.grad - expected[n].grad).abs().max().item() for n, p in trainable.items()),
        "max_grad": max(p.grad.abs().max().item() for p in trainable.values()),
        "bucketed": sorted(n.removeprefix("module.model.") for n, p in ddp.named_parameters()
                           if p in set(ddp._module_parameters)),
        "trainable": sorted(trainable),
    }
    (out / f"rank-{world.rank}.json").write_text(json.dumps(seen))
    stop()


if __name__ == "__main__":
    main()
