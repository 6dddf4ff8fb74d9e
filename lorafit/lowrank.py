"""The linear algebra of low-rank updates: pure functions over tensors (no modules, no files).

A LoRA module's update is ΔW = scaling · B @ A, with A of shape (r, in) and B of shape (out, r).
Everything here works on the factors: the SVD of ΔW comes from a QR of each factor and the SVD
of an r × r matrix, never from the out × in matrix. The truncation that keeps rank k is the
optimal one (Eckart-Young: no rank-k matrix is closer to ΔW in Frobenius or spectral norm), and
its singular values are split as √σ onto both new factors, so neither factor dwarfs the other.

"Energy" is the squared Frobenius norm: a rank-k truncation keeps Σ_{i<k} σ_i² of ‖ΔW‖_F² = Σ σ_i².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError

PRINCIPAL_INITS = ("pissa", "olora")
# Randomized SVD: extra random directions beyond the rank asked for (Halko, Martinsson and Tropp
# 2011 recommend 5-10); they make the top-r subspace accurate after a few power iterations.
OVERSAMPLE = 10


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: alpha / rank, or alpha / sqrt(rank) with rank-stabilized LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_for_scaling(scaling: float, rank: int, use_rslora: bool = False) -> float:
    """The alpha that gives `scaling` at `rank` (the inverse of `lora_scaling`)."""
    return scaling * math.sqrt(rank) if use_rslora else scaling * rank


@dataclass
class LoraFactors:
    """One adapted module's update ΔW = scaling · B @ A, as an adapter stores it."""

    A: torch.Tensor
    """(rank, in_features)"""
    B: torch.Tensor
    """(out_features, rank)"""
    alpha: float
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


# ---------------------------------------------------------------- the SVD of ΔW from its factors


def _core(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_B, M, Q_A) in float64 with ΔW = Q_B @ M @ Q_Aᵀ: Q_B (out, k_B) and Q_A (in, k_A) have
    orthonormal columns and M = scaling · R_B @ R_Aᵀ is at most r × r. ΔW and M share their
    singular values."""
    q_b, r_b = torch.linalg.qr(B.double())  # B = Q_B R_B
    q_a, r_a = torch.linalg.qr(A.double().T)  # Aᵀ = Q_A R_A, so A = R_Aᵀ Q_Aᵀ
    return q_b, scaling * (r_b @ r_a.T), q_a


def singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The singular values of scaling · B @ A (descending, float64), computed from the factors."""
    _, core, _ = _core(A, B, scaling)
    return torch.linalg.svdvals(core)


def factor_svd(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of scaling · B @ A in float64, computed from the factors:
    U (out, k), S (k,) descending, Vh (k, in), with k = min(r, out, in)."""
    q_b, core, q_a = _core(A, B, scaling)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def truncated_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) in float32 with scaling · B @ A = U_k diag(S_k) Vh_k, k = `rank`: the best
    rank-k approximation of U diag(S) Vh. √(S/scaling) goes onto each factor."""
    root = (S[:rank] / scaling).sqrt()
    return (root[:, None] * Vh[:rank]).float().contiguous(), (U[:, :rank] * root).float().contiguous()


# ---------------------------------------------------------------- reading a spectrum


def energy_fractions(S: torch.Tensor) -> torch.Tensor:
    """Cumulative share of ‖ΔW‖_F² kept by the top 1, 2, ... singular values (all zero for ΔW = 0)."""
    energy = S.double() ** 2
    total = energy.sum()
    return energy.cumsum(0) / total if total > 0 else torch.zeros_like(energy)


def energy_kept(S: torch.Tensor, rank: int) -> float:
    """The share of ‖ΔW‖_F² that a rank-`rank` truncation keeps (1 for ΔW = 0)."""
    total = float((S.double() ** 2).sum())
    return float((S[:rank].double() ** 2).sum()) / total if total > 0 else 1.0


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest rank (at least 1) whose truncation keeps at least `energy` of ‖ΔW‖_F²."""
    fractions = energy_fractions(S)
    if len(S) == 0 or fractions[-1] == 0:
        return 1
    # A relative slack of 1e-12 keeps energy=1.0 from counting singular values that are rounding noise.
    index = int(torch.searchsorted(fractions, torch.tensor(energy - 1e-12, dtype=fractions.dtype)))
    return min(index + 1, len(S))


def rank_for_ratio(S: torch.Tensor, ratio: float) -> int:
    """The number of singular values of at least σ_max / `ratio` (at least 1)."""
    if len(S) == 0 or S[0] == 0:
        return 1
    return max(1, int((S >= S[0] / ratio).sum()))


@dataclass
class SpectrumStats:
    """What a spectrum says about a module's update."""

    norm: float
    """‖ΔW‖_F"""
    effective_rank: float
    """exp of the entropy of σ/Σσ (Roy and Vetterli, 2007): r for r equal singular values."""
    rank_90: int
    """The smallest rank that keeps 90% of ‖ΔW‖_F²."""
    rank_99: int
    stable_rank: float
    """‖ΔW‖_F² / ‖ΔW‖_2²: at most the rank, and robust to tiny singular values."""


def spectrum_stats(S: torch.Tensor) -> SpectrumStats:
    """Norm, effective rank, 90%/99% energy ranks and stable rank of a descending spectrum.

    A zero update has norm 0, effective and stable rank 0, and energy ranks 0.
    """
    S = S.double()
    if len(S) == 0 or S[0] == 0:
        return SpectrumStats(0.0, 0.0, 0, 0, 0.0)
    p = S / S.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    energy = float((S ** 2).sum())
    return SpectrumStats(norm=math.sqrt(energy), effective_rank=math.exp(entropy),
                         rank_90=rank_for_energy(S, 0.9), rank_99=rank_for_energy(S, 0.99),
                         stable_rank=energy / float(S[0]) ** 2)


# ---------------------------------------------------------------- choosing ranks


@dataclass(frozen=True)
class RankRule:
    """How a truncation chooses each module's rank; exactly one field is set.

    `rank`: the same rank everywhere (at most the module's own); `energy`: the smallest rank that
    keeps this share of ‖ΔW‖_F²; `ratio`: keep the singular values of at least σ_max / ratio.
    """

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None

    def __post_init__(self):
        given = [f"--{k}" for k in ("rank", "energy", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise LorafitError(f"give exactly one of --rank, --energy, --ratio (got {', '.join(given) or 'none'})")
        if self.rank is not None and self.rank < 1:
            raise LorafitError(f"--rank {self.rank} is out of range: use a positive integer such as 8")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorafitError(f"--energy {self.energy} is out of range: use a fraction in (0, 1], e.g. 0.9")
        if self.ratio is not None and not self.ratio >= 1:
            raise LorafitError(f"--ratio {self.ratio} is out of range: use a number of at least 1, e.g. 10")

    def choose(self, S: torch.Tensor) -> int:
        """The rank to keep for a module with descending singular values `S` (at most len(S))."""
        if self.rank is not None:
            return min(self.rank, max(1, len(S)))
        if self.energy is not None:
            return min(rank_for_energy(S, self.energy), max(1, len(S)))
        return rank_for_ratio(S, self.ratio)

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.energy is not None:
            return f"energy {self.energy:g}"
        return f"ratio {self.ratio:g}"


def allocate_ranks(spectra: dict[str, torch.Tensor], total: int) -> dict[str, int]:
    """Share a budget of `total` rank between modules by singular-value energy.

    Every module keeps its top singular value; the rest of the budget goes to the largest σ²
    left over, whichever modules they belong to. That is the truncation of the whole adapter
    (all ΔW side by side) that keeps the most of Σ‖ΔW‖_F² within the budget, with no module
    dropped. A module never gets more than its spectrum's length; the total is at least one per
    module and at most the sum of the lengths.
    """
    names = list(spectra)
    if total < len(names):
        raise LorafitError(f"a total rank of {total} leaves some of the {len(names)} modules without any; "
                           f"use at least one per module")
    ranks = {name: 1 for name in names}
    rest = [(float(s) ** 2, i, j) for i, name in enumerate(names) for j, s in enumerate(spectra[name][1:], start=1)]
    rest.sort(key=lambda item: (-item[0], item[1], item[2]))  # ties: earlier module, then earlier index
    for _, i, _ in rest[:max(0, total - len(names))]:
        ranks[names[i]] += 1
    return ranks


# ---------------------------------------------------------------- PiSSA and OLoRA starting points


def randomized_svd(W: torch.Tensor, rank: int, iters: int,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` SVD (U, S, Vh) of W, approximately, by a randomized range finder with
    `iters` power iterations (Halko, Martinsson and Tropp, 2011). The random sketch comes from its
    own generator seeded with `seed`, so the result does not depend on (or move) the global RNG."""
    out_features, in_features = W.shape
    width = min(rank + OVERSAMPLE, out_features, in_features)
    generator = torch.Generator(device=W.device).manual_seed(seed)
    sketch = torch.randn(in_features, width, generator=generator, device=W.device, dtype=W.dtype)
    q, _ = torch.linalg.qr(W @ sketch)
    for _ in range(iters):  # re-orthonormalizing each time keeps small singular directions from underflowing
        z, _ = torch.linalg.qr(W.T @ q)
        q, _ = torch.linalg.qr(W @ z)
    u, s, vh = torch.linalg.svd(q.T @ W, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


def principal_factors(W: torch.Tensor, rank: int, scaling: float, method: str,
                      iters: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting factors (A0, B0) of PiSSA or OLoRA for a weight W of shape (out, in), in float32.

    pissa: scaling · B0 @ A0 = U_r diag(S_r) Vh_r, the principal part of W (its top-r SVD), with
    √(S/scaling) on both factors; `iters` selects the randomized SVD with that many power
    iterations instead of the exact one. olora: scaling · B0 @ A0 = Q_r R_r, the first r columns
    of W's QR decomposition, with B0 = Q_r orthonormal.
    """
    W = W.float()
    if method == "pissa":
        U, S, Vh = randomized_svd(W, rank, iters) if iters is not None else torch.linalg.svd(W, full_matrices=False)
        return truncated_factors(U, S, Vh, rank, scaling)
    if method == "olora":
        q, r = torch.linalg.qr(W)
        return (r[:rank] / scaling).contiguous(), q[:, :rank].contiguous()
    raise ValueError(f"unknown principal init {method!r}; expected one of {PRINCIPAL_INITS}")
