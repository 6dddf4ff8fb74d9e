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

Every patch of a model's code proves itself first: `probe` runs the model's own code and the patched
code on the same random input and switches the patch on only where outputs and gradients agree;
the `SpeedUp` it returns says, for the log, where it switched on and where it declined and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.pytorch_utils import Conv1D

MASK_BITS = 15
MASK_LEVELS = 1 << MASK_BITS

# ---------------------------------------------------------------- probes: a patch proves itself first

# The relative difference a probe allows where the patched code does the same fp32 arithmetic in
# another order (fused attention kernels, matmuls over fewer rows): rounding, about 1e-6 on the
# tiny probes. A patch that computes something else differs by 1e-2 or more.
ROUNDING = 1e-4


@dataclass
class SpeedUp:
    """What switching on one speed-up did: the modules it patched, and those it declined (name -> why)."""

    name: str
    patched: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)

    def note(self) -> str | None:
        """The log's words for it, e.g. "fused gated MLP: off for model.layers.0.mlp and 1 more (probe
        differs by 3e-02)"; None when the model has nothing it applies to."""
        if not self.declined:
            return self.name if self.patched else None
        where, why = next(iter(self.declined.items()))
        more = f" and {len(self.declined) - 1} more" if len(self.declined) > 1 else ""
        state = f"on {len(self.patched)} of {len(self.patched) + len(self.declined)}, off" if self.patched else "off"
        return f"{self.name}: {state} for {where or 'the model'}{more} ({why})"


def probe_failed(error: Exception) -> str:
    """Why a patch stays off when its probe raised: the model's code did not take the probe's input
    the way the patch assumes."""
    first_line = (str(error).splitlines() or [""])[0]
    return f"probe failed with {type(error).__name__}: {first_line}"


@contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """The conditions probes run in, all undone on exit: gradients on, every dropout off (eval mode),
    the RNG forked and seeded (training draws the same numbers as it would without probes, and probes
    the same inputs every run), and the trainable parameters moved off their values (a zero `lora_B`
    would hide the LoRA branch from a probe)."""
    device = next(model.parameters()).device
    modes = [(module, module.training) for module in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    kept = [p.detach().clone() for p in trainable]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            torch.manual_seed(0)
            with torch.no_grad():
                for p in trainable:
                    p.add_(0.1 * torch.randn_like(p))
            model.eval()
            yield
    finally:
        with torch.no_grad():
            for p, value in zip(trainable, kept):
                p.copy_(value)
        for module, mode in modes:
            module.training = mode


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: 0.0 only when they are equal, nan when either is not finite."""
    got, expected = got.detach().float(), expected.detach().float()
    error = (got - expected).abs().max() if got.numel() else torch.zeros(())
    scale = expected.abs().max() if expected.numel() else torch.ones(())
    return (error / scale.clamp_min(torch.finfo(torch.float32).tiny)).item()


def probe(reference: Callable, candidate: Callable, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """The largest relative difference between `reference(*inputs)` and `candidate(*inputs)` (each
    returns one tensor) and between their gradients of one random cotangent with respect to the
    floating-point inputs and `params` (say, the LoRA factors inside). 0.0 means bit for bit."""
    results, cotangent = [], None
    for function in (reference, candidate):
        leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
        out = function(*leaves)
        if cotangent is None:
            cotangent = torch.randn_like(out)
        wrt = [x for x in leaves if x.requires_grad] + list(params)
        grads = torch.autograd.grad(out, wrt, cotangent, allow_unused=True)
        results.append([out] + [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)])
    return max(relative_difference(got, expected) for expected, got in zip(*results))


def probe_labels(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a model-level probe passes beside `probe_batch`'s ids for the forward to run as in
    training: a seq2seq LM (T5, Marian, a warm-started EncoderDecoderModel) makes its decoder inputs
    from labels only, so it gets the ids less the last (a target shorter than the source, as
    translations have, gives cross-attention scores that are not square); other models nothing
    (BART's and T5's classifiers make decoder inputs from the input ids)."""
    seq2seq_lm = model.config.is_encoder_decoder and model.can_generate()
    return {"labels": ids[:, :-1].contiguous()} if seq2seq_lm else {}


def probe_batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (2, 6) for a model-level probe, and an attention mask whose second row ends
    in two pad positions (a third of its tokens). Each row's last real token is the model's EOS and
    no other token is: the sequence classifiers of BART and T5 read the hidden state there."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 6), device=device)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[ids == eos] = (eos + 1) % vocab
        ids[0, 5] = ids[1, 3] = eos
    return ids, mask


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


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
# Attention arguments whose math `dropout_attention` does not do: a model passing any of them keeps SDPA.
UNSUPPORTED_ATTENTION_ARGUMENTS = ("position_bias", "sliding_window", "softcap", "s_aux", "sinks")


def attention_registries():
    """transformers' registries of attention functions and of their mask builders. Imported where
    used: they pull in transformers' model code (seconds), which commands that only read adapter
    files (lorafit inspect) never need."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


def sdpa_fast_dropout(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' SDPA attention, except that attention dropout on a CPU uses `drop_mask`.

    Without dropout (evaluation, or p = 0) this is transformers' SDPA itself, fused kernels and all.
    """
    if dropout == 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        sdpa = attention_registries()[0]["sdpa"]
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)
    return dropout_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal), None


def dropout_attention(module, query, key, value, attention_mask, dropout: float, scaling=None,
                      is_causal=None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) with `drop_mask` dropout, times v: (batch, length, heads, head_dim).
    With `dropout` 0 nothing is dropped, which is how the probes compare it with SDPA."""
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
    return output.transpose(1, 2).contiguous()


def _attention_calls(model: nn.Module) -> list[tuple]:
    """(module, query, key, value, attention_mask, kwargs) of every attention-function call the model
    makes in training mode on a probe batch (with `probe_labels`), with a padding mask and without one.
    The model is back on SDPA afterwards."""
    functions, masks = attention_registries()
    sdpa, calls = functions["sdpa"], []

    def record(module, query, key, value, attention_mask, **kwargs):
        calls.append((module, query, key, value, attention_mask, kwargs))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    masks.register(ATTENTION, masks["sdpa"])
    functions.register(ATTENTION, record)
    try:
        model.set_attn_implementation(ATTENTION)
        model.train()  # so that the calls pass their dropout rates
        ids, mask = probe_batch(model)
        labels = probe_labels(model, ids)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **labels)
            model(input_ids=ids, **labels)  # causal or full attention without a mask
    finally:
        functions.register(ATTENTION, sdpa_fast_dropout)
        model.set_attn_implementation("sdpa")
    return calls


def use_fast_attention_dropout(model: nn.Module) -> SpeedUp:
    """Switch a model whose SDPA attention drops out to `sdpa_fast_dropout`, once a probe has shown,
    for every attention call of a probe batch, that it goes through transformers' attention
    functions, passes no argument `dropout_attention` ignores, and that `dropout_attention` with
    nothing dropped gives SDPA's output and q/k/v gradients (the attention function has no
    parameters; LoRA's gradients come through q, k and v). Its masks are random and differ from
    torch's, so they are tested apart. Models without attention dropout keep SDPA: the fast
    function would hand every call on to it."""
    speed_up = SpeedUp("fast attention dropout")
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return speed_up
    sdpa = attention_registries()[0]["sdpa"]
    names = {id(module): name for name, module in model.named_modules()}
    with probing(model):
        try:
            calls = _attention_calls(model)
        except Exception as error:  # a model this probe cannot drive keeps its attention
            speed_up.declined[""] = probe_failed(error)
            return speed_up
        if not calls:
            speed_up.declined[""] = "its attention does not call transformers' attention functions"
            return speed_up
        if not any(kwargs.get("dropout", 0.0) > 0 for *_, kwargs in calls):
            return speed_up
        for module, query, key, value, attention_mask, kwargs in calls:
            name = names.get(id(module), type(module).__name__)
            unsupported = [k for k in UNSUPPORTED_ATTENTION_ARGUMENTS if kwargs.get(k) is not None]
            if unsupported:
                speed_up.declined.setdefault(name, f"attention passes {unsupported[0]}")
                continue
            rest = {k: v for k, v in kwargs.items() if k != "dropout"}
            scaling, is_causal = rest.get("scaling"), rest.get("is_causal")
            difference = probe(
                lambda q, k, v: sdpa(module, q, k, v, attention_mask, dropout=0.0, **rest)[0],
                lambda q, k, v: dropout_attention(module, q, k, v, attention_mask, 0.0, scaling, is_causal),
                [query, key, value], [])
            if not difference <= ROUNDING:
                speed_up.declined.setdefault(name, f"probe differs by {difference:.0e}")
    if not speed_up.declined:
        model.set_attn_implementation(ATTENTION)
        speed_up.patched = list(dict.fromkeys(names.get(id(call[0]), "") for call in calls))
    return speed_up


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


def in_features(module: nn.Module) -> int:
    """The input width of a Linear, or of the Linear inside a wrapper (a LoRA layer)."""
    return next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features


def use_fused_gated_mlp(model: nn.Module, dtype: torch.dtype = torch.float32) -> SpeedUp:
    """Give Llama-style gated MLPs (gate_proj, up_proj, down_proj, a SiLU by name) the `silu_mul`
    forward where a probe under autocast to `dtype` (none for fp32) shows that it gives the bits of
    the module's own output and of its input and LoRA gradients. The forward is the same
    computation; the backward saves less."""
    speed_up = SpeedUp("fused gated MLP")
    projections = ("gate_proj", "up_proj", "down_proj")
    candidates = [(name, module) for name, module in model.named_modules()
                  if type(module).__name__.endswith("MLP")
                  and all(isinstance(getattr(module, n, None), nn.Module) for n in projections)
                  and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")]
    if not candidates:
        return speed_up
    device = next(model.parameters()).device
    with probing(model), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for name, module in candidates:
            x = torch.randn(2, 3, in_features(module.gate_proj), device=device)
            try:
                difference = probe(module, lambda h: _gated_mlp_forward(module, h), [x], trainable_parameters(module))
            except Exception as error:  # not a (hidden) -> (hidden) MLP
                speed_up.declined[name] = probe_failed(error)
                continue
            if difference == 0.0:
                speed_up.patched.append(name)
            else:
                speed_up.declined[name] = f"probe differs by {difference:.0e}"
    for name in speed_up.patched:
        module = model.get_submodule(name)
        module.forward = _gated_mlp_forward.__get__(module)
    return speed_up


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


def _rms_norm_mismatch(norm: nn.Module) -> str | None:
    """Why `_RMSNorm` cannot stand in for `norm`, or None when it can: that takes a frozen fp32 weight
    with no zeros, an epsilon, and the same bf16 output as the module's own forward on a random input."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if (not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.dim() != 1
            or not isinstance(eps, float)):
        return "not an RMSNorm with an fp32 weight and variance_epsilon"
    if weight.requires_grad:
        return "its weight trains"
    if bool((weight == 0).any()):
        return "its weight has zeros"
    x = 3 * torch.randn(2, 5, weight.shape[0], device=weight.device)
    with torch.no_grad():
        expected = norm(x).to(torch.bfloat16)
        got = _RMSNorm.apply(x, weight, eps, torch.bfloat16)
    difference = relative_difference(got, expected)
    return None if difference == 0.0 else f"probe differs by {difference:.0e}"


def use_fused_rms_norm(model: nn.Module) -> SpeedUp:
    """Give the RMSNorms of Llama-style decoder layers, and the final norm before the head, the
    `_RMSNorm` forward for training under autocast, where `_rms_norm_mismatch` finds nothing.
    Evaluation and fp32 training run the model's own forward."""
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
    speed_up = SpeedUp("fused RMSNorm")
    names = {id(module): name for name, module in model.named_modules()}
    with probing(model):
        for norm in norms:
            mismatch = _rms_norm_mismatch(norm)
            if mismatch is None:
                norm.forward = _fused_rms_norm_forward.__get__(norm)
                speed_up.patched.append(names[id(norm)])
            else:
                speed_up.declined[names[id(norm)]] = mismatch
    return speed_up


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
    """sum_i CE(f(hidden_i · Wᵀ + b + c), target_i), computed `chunk` rows at a time, for a frozen head,
    a constant fp32 logit bias c (None: none) and an elementwise `LogitTransform` f (None: none),
    both acting on the fp32 logits.

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
                transform: LogitTransform | None, logit_bias: torch.Tensor | None):
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk].to(dtype), w, b).float()
            if logit_bias is not None:
                logits = logits + logit_bias
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
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int | None = None,
                       transform: LogitTransform | None = None, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of `transform(head(hidden) + logit_bias)` against `targets` (rows of
    hidden, one target each); no `transform` means the logits as they are, no `logit_bias` adds
    nothing. `logit_bias` is a (vocabulary,) vector a model's forward adds to its head's output
    (BART's and Marian's `final_logits_bias`), added to the fp32 logits as such a forward adds its
    fp32 buffer to the head's output under autocast.

    `chunk` rows at a time; by default 256 on CPUs, where small chunks stay in cache (measured on
    SmolLM2, one run each: 256 rows ran 18% faster than 1,024, with 0.4 GB less peak RSS), and 2,048 on GPUs,
    where each chunk costs kernel launches.

    Equal to `F.cross_entropy(transform(head(hidden).float() + logit_bias), targets, reduction="sum")`
    (up to float summation order) without materializing all the logits. Falls back to exactly that
    when the head is not a plain frozen Linear (it trains, carries LoRA, or is a subclass with its
    own forward).
    """
    if logit_bias is not None:
        logit_bias = logit_bias.detach().float().reshape(-1)
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        logits = head(hidden).float()
        logits = logits if logit_bias is None else logits + logit_bias
        return F.cross_entropy(logits if transform is None else transform(logits), targets, reduction="sum")
    chunk = chunk or (256 if hidden.device.type == "cpu" else 2048)
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, compute_dtype(hidden), with_grad,
                                   transform, logit_bias)
