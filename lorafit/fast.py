"""Speed-ups for training on top of a loaded model; each one keeps the model's math as it was.

- `FastDropout`: dropout whose mask is cut from 64-bit random words (four 15-bit draws per word)
  instead of `bernoulli_`, about five times cheaper on CPUs, where `nn.Dropout` was a third of a
  MiniLM training step. The drop probability is rounded to a multiple of 2^-15 (0.1 -> 0.100006).
- `store_frozen_weights`: frozen Linear weights kept in bf16 once, instead of autocast casting
  them again at every step; results are bit-identical under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

MASK_BITS = 15
MASK_LEVELS = 1 << MASK_BITS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - round(p·2^15)/2^15.

    `random_()` on int64 gives 63 uniform bits per word (the top bit is 0); every 16-bit piece
    of a word, less its top bit, is a uniform 15-bit number.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    draws = words.view(torch.int16)[:n] & (MASK_LEVELS - 1)
    return (draws >= round(p * MASK_LEVELS)).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)  # one byte per element, not a float mask
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class FastDropout(nn.Dropout):
    """`nn.Dropout` with the cheap mask above on CPU; GPUs keep their fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p >= 1:
            return F.dropout(x, self.p, True, self.inplace)
        return _Dropout.apply(x, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` with p > 0 for a `FastDropout`; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, FastDropout(child.p, child.inplace))
                swapped += 1
    return swapped


def store_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep frozen Linear/Conv1D weights and biases in `dtype`; returns the number of layers changed.

    Only for training under autocast to `dtype`: autocast would cast these same tensors to `dtype`
    at every forward, so storing them that way gives the same bits for half the memory and no
    per-step casts. Parameters shared with another module (tied embeddings) stay as they are,
    since embeddings and norms are not autocast.
    """
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    changed = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad or counts[id(p)] > 1 or not p.is_floating_point() for p in params):
            continue
        module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        changed += 1
    return changed
