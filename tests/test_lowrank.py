"""The low-rank math on its own: spectra from factors, optimal truncation, rank rules, budgets,
PiSSA/OLoRA starting factors, and PEFT's rank_pattern matching rule."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.adapter import rank_fields
from lorafit.errors import LorafitError
from lorafit.lora import pattern_value
from lorafit.lowrank import (RankRule, allocate_ranks, energy_kept, factor_svd, principal_factors, randomized_svd,
                             rank_for_energy, rank_for_ratio, singular_values, spectrum_stats, truncated_factors)

peft_other = pytest.importorskip("peft.utils.other")


def factors(out_features: int, in_features: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, in_features, generator=generator), torch.randn(out_features, rank, generator=generator))


@pytest.mark.parametrize("shape", [(48, 32, 4), (32, 48, 8), (6, 40, 8), (40, 5, 16), (64, 64, 1)])
def test_singular_values_from_the_factors_equal_svdvals_of_the_full_update(shape):
    out_features, in_features, rank = shape  # the last three: rank above out or in, and rank one
    A, B = factors(out_features, in_features, rank)
    full = 1.5 * (B.double() @ A.double())
    expected = torch.linalg.svdvals(full)[:min(shape)]
    torch.testing.assert_close(singular_values(A, B, 1.5), expected, rtol=1e-10, atol=1e-10)
    U, S, Vh = factor_svd(A, B, 1.5)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, full, rtol=1e-10, atol=1e-10)


def test_a_zero_update_has_zero_singular_values_and_an_empty_spectrum():
    A, B = factors(8, 8, 4)
    S = singular_values(A, torch.zeros_like(B), 2.0)
    assert S.abs().max() == 0
    assert spectrum_stats(S) == spectrum_stats(torch.zeros(0))
    assert spectrum_stats(S).effective_rank == 0 and spectrum_stats(S).rank_90 == 0


def test_truncation_is_the_optimal_one_and_splits_the_singular_values_evenly():
    A, B = factors(40, 30, 8)
    U, S, Vh = factor_svd(A, B, 2.0)
    A3, B3 = truncated_factors(U, S, Vh, 3, scaling=0.5)
    assert A3.shape == (3, 30) and B3.shape == (40, 3)
    approx = 0.5 * (B3.double() @ A3.double())
    error = torch.linalg.matrix_norm(2.0 * B.double() @ A.double() - approx)
    # Eckart-Young: the error of the best rank-3 approximation is the norm of the dropped singular values.
    assert error.item() == pytest.approx(S[3:].norm().item(), rel=1e-5)
    # √σ on both sides: the k-th row of A and column of B have the same norm, √(σ_k / scaling).
    torch.testing.assert_close(A3.norm(dim=1).double(), (S[:3] / 0.5).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(B3.norm(dim=0).double(), (S[:3] / 0.5).sqrt(), rtol=1e-5, atol=0)


def test_spectrum_statistics_of_known_spectra():
    flat = spectrum_stats(torch.ones(4, dtype=torch.float64))
    assert (flat.norm, flat.effective_rank, flat.rank_90, flat.rank_99, flat.stable_rank) == \
        pytest.approx((2.0, 4.0, 4, 4, 4.0))
    steep = spectrum_stats(torch.tensor([3.0, 1.0], dtype=torch.float64))
    p = torch.tensor([0.75, 0.25])
    assert steep.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert steep.norm == pytest.approx(math.sqrt(10))
    assert steep.stable_rank == pytest.approx(10 / 9)
    assert (steep.rank_90, steep.rank_99) == (1, 2)  # 9/10 of the energy in σ_1: exactly 90%


def test_energy_rank_keeps_at_least_the_energy_asked_for_and_no_more_rank_than_needed():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        S = torch.rand(12, generator=generator, dtype=torch.float64).sort(descending=True).values ** 3
        for energy in (0.1, 0.5, 0.9, 0.99, 1.0):
            k = rank_for_energy(S, energy)
            assert energy_kept(S, k) >= energy - 1e-12
            assert k == 1 or energy_kept(S, k - 1) < energy
    # energy 1.0 needs every singular value but exact zeros and rounding noise (a share below 1e-12)
    assert rank_for_energy(torch.tensor([1.0, 1e-5, 0.0], dtype=torch.float64), 1.0) == 2
    assert rank_for_energy(torch.tensor([1.0, 1e-7, 0.0], dtype=torch.float64), 1.0) == 1


def test_ratio_rank_keeps_singular_values_of_at_least_the_largest_over_ratio():
    S = torch.tensor([10.0, 5.0, 1.0, 0.99, 0.1])
    assert rank_for_ratio(S, 10) == 3
    assert rank_for_ratio(S, 2) == 2
    assert rank_for_ratio(S, 1) == 1
    assert rank_for_ratio(torch.zeros(3), 10) == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "give exactly one of --rank, --energy, --ratio (got none)"),
    ({"rank": 4, "energy": 0.9}, "give exactly one of --rank, --energy, --ratio (got --rank, --energy)"),
    ({"energy": 0.0}, "--energy 0.0 is out of range: use a fraction in (0, 1], e.g. 0.9"),
    ({"energy": 1.5}, "--energy 1.5 is out of range: use a fraction in (0, 1], e.g. 0.9"),
    ({"rank": 0}, "--rank 0 is out of range: use a positive integer such as 8"),
    ({"ratio": 0.5}, "--ratio 0.5 is out of range: use a number of at least 1, e.g. 10"),
])
def test_bad_rank_rules_are_refused(kwargs, message):
    with pytest.raises(LorafitError) as caught:
        RankRule(**kwargs)
    assert str(caught.value) == message


def test_a_budget_goes_to_the_largest_singular_values_with_one_per_module_at_least():
    spectra = {"a": torch.tensor([10.0, 9.0, 8.0, 1.0]), "b": torch.tensor([0.5, 0.4, 0.3, 0.2]),
               "c": torch.tensor([5.0, 4.5, 0.1, 0.0])}
    assert allocate_ranks(spectra, 3) == {"a": 1, "b": 1, "c": 1}
    assert allocate_ranks(spectra, 6) == {"a": 3, "b": 1, "c": 2}
    assert allocate_ranks(spectra, 12) == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(LorafitError, match="a total rank of 2 leaves some of the 3 modules without any"):
        allocate_ranks(spectra, 2)


def test_randomized_svd_finds_the_top_of_a_decaying_spectrum():
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(80, 40, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(60, 40, generator=generator, dtype=torch.float64))
    S = 0.7 ** torch.arange(40, dtype=torch.float64)
    W = U @ torch.diag(S) @ V.T
    Ur, Sr, Vhr = randomized_svd(W, 6, iters=4)
    torch.testing.assert_close(Sr, S[:6], rtol=1e-8, atol=0)
    torch.testing.assert_close((Ur @ torch.diag(Sr) @ Vhr), U[:, :6] @ torch.diag(S[:6]) @ V[:, :6].T,
                               rtol=0, atol=1e-8)
    again = randomized_svd(W, 6, iters=4)
    assert all(torch.equal(x, y) for x, y in zip(again, (Ur, Sr, Vhr)))  # its own seeded generator


def test_pissa_factors_are_the_principal_part_of_the_weight():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    A0, B0 = principal_factors(W, 4, scaling=2.0, method="pissa")
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(2.0 * B0 @ A0, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=0, atol=1e-5)
    fast_A0, fast_B0 = principal_factors(W, 4, scaling=2.0, method="pissa", iters=8)
    torch.testing.assert_close(2.0 * fast_B0 @ fast_A0, 2.0 * B0 @ A0, rtol=0, atol=1e-3)


def test_olora_factors_are_the_first_qr_columns_with_an_orthonormal_b():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    A0, B0 = principal_factors(W, 4, scaling=2.0, method="olora")
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(B0.T @ B0, torch.eye(4), rtol=0, atol=1e-6)
    torch.testing.assert_close(2.0 * B0 @ A0, Q[:, :4] @ R[:4], rtol=0, atol=1e-6)


def test_pattern_matching_follows_peft():
    patterns = {"query": 2, "layer.1.attention.self.value": 3, r"layer\.\d\.output\.dense": 5}
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value",
             "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.output.dense",
             "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.0.attention.self.myquery"]
    for name in names:
        key = peft_other.get_pattern_key(patterns.keys(), name)
        assert pattern_value(patterns, name, 8) == patterns.get(key, 8), name
    assert [pattern_value(patterns, n, 8) for n in names] == [2, 3, 8, 5, 8, 8]


def test_written_patterns_give_every_module_its_own_value_under_peft_matching():
    ranks = {"model.a.b": 4, "model.x.a.b": 8, "model.y.c": 8, "model.z": 2}
    fields = rank_fields(ranks, {name: 2.0 * r for name, r in ranks.items()})
    assert fields["r"] == 8 and fields["lora_alpha"] == 16.0
    assert fields["rank_pattern"] == {"model.a.b": 4, "model.z": 2}  # plain names where they are unambiguous
    for name, rank in ranks.items():
        key = peft_other.get_pattern_key(fields["rank_pattern"].keys(), name)
        assert fields["rank_pattern"].get(key, fields["r"]) == rank
    # "a.b" as a suffix also names "x.a.b" (PEFT matches at any dotted suffix): anchored, escaped keys then.
    clash = rank_fields({"a.b": 4, "x.a.b": 8, "y": 8}, {"a.b": 1.0, "x.a.b": 1.0, "y": 1.0})
    assert clash["rank_pattern"] == {r"^a\.b": 4} and clash["alpha_pattern"] == {}
    for name, rank in {"a.b": 4, "x.a.b": 8, "y": 8}.items():
        key = peft_other.get_pattern_key(clash["rank_pattern"].keys(), name)
        assert clash["rank_pattern"].get(key, clash["r"]) == rank
