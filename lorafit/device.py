"""Device, precision and autocast: one rule for training, evaluation and generation alike, so that
scoring a trained model reproduces the numbers its training logged."""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a recipe's `train.precision` ("auto", "bf16" or "fp32") on `device`."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return torch.float32
    return torch.bfloat16


def autocast_for(device: torch.device, dtype: torch.dtype):
    """A context-manager factory: bf16 autocast, or nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"
