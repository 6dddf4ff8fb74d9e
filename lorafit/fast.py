"""Speed-ups for training on top of a loaded model. Each keeps the model's forward math as it was;
the backwards are exact too, except the fused RMSNorm's, which works at the bf16 precision of the
output it keeps (tested against autograd).

- `FastDropout`: dropout whose mask is cut from 64-bit random words (four 15-bit draws per word)
  instead of `bernoulli_`, about five times cheaper on CPUs, where `nn.Dropout` was a third of a
  MiniLM training step. The drop probability is rounded to a multiple of 2^-15 (0.1 -> 0.100006).
  The attention-probability dropout gets the same masks through `ATTENTION`, an SDPA attention
  that does the dropout itself (torch's SDPA falls back to its slow math path with bernoulli
  masks whenever dropout is on, and has no fast path for it on CPUs).
- `store_frozen_weights`: frozen Linear weights kept in bf16 once, instead of autocast casting
  them again at every step; results are bit-identical under bf16 autocast.
- `head_cross_entropy`: the LM head (and the scaling or soft-capping a model's forward applies
  to its logits, `LogitTransform`) and its loss a chunk of rows at a time, its gradient formed
  in the forward.
- `use_fused_gated_mlp`: Llama-style MLPs keep two activations for the backward instead of three.
- `use_fused_rms_norm`: under autocast, Llama-style RMSNorms hand their Linears the autocast copy
  of their output and keep only that for the backward, not their fp32 input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.pytorch_utils import Conv1D

MASK_BITS = 15
MASK_LEVELS = 1 << MASK_BITS


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, each element True (dropped) with probability round(p·2^15)/2^15.

    `random_()` on int64 gives 63 uniform bits per word (the top bit is 0); every 16-bit piece
    of a word, less its top bit, is a uniform 15-bit number.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    draws = words.view(torch.int16)[:n] & (MASK_LEVELS - 1)
    return (draws < round(p * MASK_LEVELS)).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        drop = drop_mask(x.shape, p, x.device)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(drop)  # one byte per element, not a float mask
        return x.masked_fill(drop, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None


class FastDropout(nn.Dropout):
    """`nn.Dropout` with the cheap mask above on CPU; GPUs keep their fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p >= 1:
            return F.dropout(x, self.p, True, self.inplace)
        return _Dropout.apply(x, self.p)


ATTENTION = "lorafit_sdpa"


def sdpa_fast_dropout(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' SDPA attention, except that attention dropout on a CPU uses `drop_mask`.

    Without dropout (evaluation, or p = 0) this is transformers' SDPA itself, fused kernels and all.
    """
    if dropout == 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :kv_length]
        if mask.dtype == torch.bool:  # True = attend; a large negative, not -inf, keeps empty rows finite
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    elif (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_length > 1:
        causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - q_length)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs.masked_fill(drop_mask(probs.shape, dropout, probs.device), 0)
    output = torch.matmul(probs, value) * (1.0 / (1.0 - dropout))  # scaling the output is the cheaper pass
    return output.transpose(1, 2).contiguous(), None


def use_fast_attention_dropout(model: nn.Module) -> bool:
    """Switch a model that uses SDPA attention to `sdpa_fast_dropout`; returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    # Imported here: they pull in transformers' model code (seconds), which commands that only read
    # adapter files (lorafit inspect) never need.
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_fast_dropout)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(ATTENTION)
    return True


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


# ---------------------------------------------------------------- gated MLP: silu(gate) * up


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up: autograd would also keep silu(gate), a third of a
    gated MLP's saved activations. The backward recomputes silu(gate) (one cheap kernel)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def use_fused_gated_mlp(model: nn.Module) -> int:
    """Give every Llama-style gated MLP (gate_proj, up_proj, down_proj, SiLU) the `silu_mul`
    forward; returns how many. The forward is the same computation; the backward saves less."""
    patched = 0
    for module in model.modules():
        if (type(module).__name__.endswith("MLP")
                and all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
                and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            module.forward = _gated_mlp_forward.__get__(module)
            patched += 1
    return patched


# ---------------------------------------------------------------- RMSNorm into the autocast dtype


class _RMSNorm(torch.autograd.Function):
    """`weight * (x / rms(x))` as Llama's RMSNorm computes it, returned in `dtype`, the autocast
    dtype of the Linears it feeds (the same bits their autocast cast would make).

    Autograd would keep the fp32 input (the residual stream) for the backward; this keeps the bf16
    output, which the LoRA layers reading it keep anyway, and 1/rms per row. The backward recovers
    x / rms(x) as output / weight, so it works at the precision of that bf16 output, as the Linears'
    own backward does. Needs a frozen weight with no zeros (checked when patching).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (weight * (xf * rstd).to(x.dtype)).to(dtype)
        ctx.save_for_backward(y, rstd, weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, rstd, weight = ctx.saved_tensors
        w = weight.to(torch.float32)
        normed = y.to(torch.float32).div_(w)
        grad_normed = grad.to(torch.float32).mul_(w)
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd)
        return grad_x.to(ctx.x_dtype), None, None, None


def _fused_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(x)
    if x.dtype == torch.float32 and dtype != torch.float32 and torch.is_grad_enabled():
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon, dtype)
    return type(self).forward(self, x)  # evaluation, fp32 training: the model's own


# Decoder layers whose two RMSNorms feed only Linears: input_layernorm -> q/k/v projections,
# post_attention_layernorm -> the MLP's gate/up projections (other families put norms elsewhere).
LLAMA_STYLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _same_rms_norm(norm: nn.Module) -> bool:
    """Whether `_RMSNorm` can stand in for `norm`: a frozen fp32 weight with no zeros, an epsilon,
    and the same bf16 output as the module's own forward on a random input."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if (not isinstance(weight, torch.Tensor) or weight.requires_grad or weight.dtype != torch.float32
            or weight.dim() != 1 or not isinstance(eps, float) or bool((weight == 0).any())):
        return False
    x = 3 * torch.randn(2, 5, weight.shape[0], device=weight.device)
    with torch.no_grad():
        expected = norm(x).to(torch.bfloat16)
        got = _RMSNorm.apply(x, weight, eps, torch.bfloat16)
    return torch.equal(expected, got)


def use_fused_rms_norm(model: nn.Module) -> int:
    """Give the RMSNorms of Llama-style decoder layers, and the final norm before the head, the
    `_RMSNorm` forward for training under autocast; returns how many. Evaluation and fp32 training
    run the model's own forward."""
    def llama_style(module) -> bool:
        return type(module).__name__ in LLAMA_STYLE_LAYERS

    norms = []
    for module in model.modules():
        if llama_style(module):
            norms += [module.input_layernorm, module.post_attention_layernorm]
        elif type(module).__name__.endswith(("ForCausalLM", "ForSequenceClassification")):
            base = getattr(module, "model", None)
            if any(llama_style(layer) for layer in getattr(base, "layers", ())):
                norms.append(base.norm)  # the final norm, read only by the head
    patched = 0
    for norm in norms:
        if _same_rms_norm(norm):
            norm.forward = _fused_rms_norm_forward.__get__(norm)
            patched += 1
    return patched


# ---------------------------------------------------------------- LM head + cross-entropy in chunks


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a Linear on `t` would run in here: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does to its head's output before the loss: multiply by `scale`,
    or divide by `divisor`, or soft-cap to ±`softcap` (`softcap * tanh(logits / softcap)`, as
    Gemma 2 does). Each is written as the models write it, so that on the same tensor the result
    has the same bits as the model's own (`lm.loss_path` checks this before using one).
    """

    scale: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def slope(self, transformed: torch.Tensor) -> torch.Tensor | float:
        """d(output)/d(input) elementwise, from the output (the tanh's derivative is 1 - tanh²)."""
        slope = (self.scale or 1.0) / (self.divisor or 1.0)
        if self.softcap is not None:
            return (1.0 - (transformed / self.softcap).square()).mul_(slope)
        return slope

    def describe(self) -> str:
        if self.scale is not None:
            return f"logits × {self.scale:g}"
        if self.divisor is not None:
            return f"logits / {self.divisor:g}"
        return f"logits soft-capped at {self.softcap:g}" if self.softcap is not None else "logits as they are"


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(f(hidden_i · Wᵀ + b), target_i), computed `chunk` rows at a time, for a frozen head
    and an elementwise `LogitTransform` f (None: none), which acts on the fp32 logits.

    Only the (chunk × vocabulary) logits of one chunk exist at any time. The loss is a sum of
    per-row terms, so its gradient with respect to `hidden` is known once each chunk's softmax is:
    the forward forms (softmax - onehot) · f' · W for the chunk right away and keeps only that
    (rows × hidden), and the backward scales it by the incoming gradient. No logits are kept or
    recomputed: three head matmuls per chunk become two, and the (rows × vocabulary) fp32 logits,
    their softmax and their gradient (about 1 GB for SmolLM2's 49k vocabulary at 8 × 256 tokens)
    never exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype, with_grad: bool,
                transform: LogitTransform | None):
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk].to(dtype), w, b).float()
            if transform is not None:
                logits = transform(logits)
            rows_targets = targets[start:start + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, rows_targets[:, None]).squeeze(1)).sum()
            if with_grad:
                slope = None if transform is None else transform.slope(logits)  # f', before the softmax overwrites f
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(probs.shape[0], device=probs.device), rows_targets] -= 1.0
                if slope is not None:
                    probs.mul_(slope)
                grad_hidden[start:start + chunk] = (probs.to(dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int | None = None,
                       transform: LogitTransform | None = None) -> torch.Tensor:
    """Summed cross-entropy of `transform(head(hidden))` against `targets` (rows of hidden, one
    target each); no `transform` means the head's logits as they are.

    `chunk` rows at a time; by default 256 on CPUs, where small chunks stay in cache (measured on
    SmolLM2, one run each: 256 rows ran 18% faster than 1,024, with 0.4 GB less peak RSS), and 2,048 on GPUs,
    where each chunk costs kernel launches.

    Equal to `F.cross_entropy(transform(head(hidden).float()), targets, reduction="sum")` (up to
    float summation order) without materializing all the logits. Falls back to exactly that when
    the head is not a plain frozen Linear (it trains, carries LoRA, or is a subclass with its own
    forward).
    """
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        logits = head(hidden).float()
        return F.cross_entropy(logits if transform is None else transform(logits), targets, reduction="sum")
    chunk = chunk or (256 if hidden.device.type == "cpu" else 2048)
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, compute_dtype(hidden), with_grad,
                                   transform)
