"""Low-rank algebra against dense float64 computations."""
from __future__ import annotations

import pytest
import torch

from domerge_core.algebra import linalg as L

torch.set_num_threads(1)


def rnd(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_exact_svd_reconstructs_and_matches_singular_values():
    B, A = rnd(3, 40, 9, seed=1), rnd(3, 9, 30, seed=2)
    U, S, Vh = L.exact_svd(B, A)
    D = B @ A
    assert torch.allclose(U * S.unsqueeze(-2) @ Vh, D, atol=1e-11)
    assert torch.allclose(S, torch.linalg.svdvals(D)[..., :9], rtol=1e-10)
    assert torch.allclose(U.mT @ U, torch.eye(9, dtype=B.dtype).expand(3, 9, 9), atol=1e-12)


def test_exact_svd_when_stacked_rank_exceeds_a_dimension():
    B, A = rnd(2, 10, 14, seed=3), rnd(2, 14, 25, seed=4)      # R = 14 > m = 10
    U, S, Vh = L.exact_svd(B, A)
    assert torch.allclose(U * S.unsqueeze(-2) @ Vh, B @ A, atol=1e-10)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_truncate_error_is_tail_energy_fp32(k):
    B, A = rnd(4, 50, 12, seed=5), rnd(4, 12, 35, seed=6)
    D = B @ A
    up, down, ks, err = L.truncate(B.float(), A.float(), rank=k)
    S = torch.linalg.svdvals(D)
    tail = ((S[..., k:] ** 2).sum(-1) / (S ** 2).sum(-1)).sqrt()
    actual = (up.double() @ down.double() - D).norm(dim=(-1, -2)) / D.norm(dim=(-1, -2))
    assert (ks == k).all()
    assert torch.allclose(err, tail, rtol=1e-4, atol=1e-6)
    assert torch.allclose(actual, tail, rtol=1e-4, atol=1e-6)


def test_truncate_by_energy_keeps_smallest_rank_reaching_it():
    B, A = rnd(3, 30, 10, seed=7), rnd(3, 10, 20, seed=8)
    up, down, ks, err = L.truncate(B, A, energy=0.9)
    S = torch.linalg.svdvals(B @ A)
    frac = torch.cumsum(S ** 2, -1) / (S ** 2).sum(-1, keepdim=True)
    for i in range(3):
        k = int(ks[i])
        assert frac[i, k - 1] >= 0.9 - 1e-12
        assert k == 1 or frac[i, k - 2] < 0.9
        # columns past a module's own rank are zero
        assert float(up[i, :, k:].abs().sum()) == 0.0


def test_balanced_is_gauge_free():
    B, A = rnd(25, 5, seed=9), rnd(5, 18, seed=10)
    G = rnd(5, 5, seed=11) + 3 * torch.eye(5, dtype=torch.float64)        # any invertible gauge
    b1, a1 = L.balanced(B, A)
    b2, a2 = L.balanced(B @ G, torch.linalg.solve(G, A))
    assert torch.allclose(b1 @ a1, B @ A, atol=1e-11)
    assert torch.allclose(b1.mT @ b1, a1 @ a1.mT, atol=1e-10)            # balanced: equal Grams
    # unique up to the signs of singular vectors
    assert torch.allclose(b1.abs(), b2.abs(), atol=1e-9)
    assert torch.allclose(a1.abs(), a2.abs(), atol=1e-9)


def test_inner_products_norms_and_column_norms_from_grams():
    ranks = [3, 4, 2]
    B, A = rnd(2, 20, 9, seed=12), rnd(2, 9, 15, seed=13)
    K = L.block_inner_products(B, A, ranks)
    parts, o = [], 0
    for r in ranks:
        parts.append(B[..., o:o + r] @ A[..., o:o + r, :])
        o += r
    for i in range(3):
        for j in range(3):
            assert torch.allclose(K[:, i, j], (parts[i] * parts[j]).sum((-1, -2)), rtol=1e-10)
    C = L.cosine_from_inner(K)
    assert torch.allclose(torch.diagonal(C, dim1=-2, dim2=-1), torch.ones(2, 3, dtype=C.dtype))
    assert torch.allclose(L.col_norms(B, A), (B @ A).norm(dim=-2), rtol=1e-10)
    assert torch.allclose(L.frob_norm(B, A), (B @ A).norm(dim=(-1, -2)), rtol=1e-10)


def test_balanced_keeps_input_rank_when_rank_exceeds_a_dimension():
    """A rank-8 LoRA on a layer with in_features 4 (and a rank-64 one on SD's conv_in, in·kh·kw = 36):
    the product has ≤ min(m, n) singular values; the balanced factors keep r columns / rows (zero
    padded) so stacked factors keep their block layout."""
    for m, r, n in ((64, 8, 4), (320, 64, 36), (6, 10, 30)):
        B, A = rnd(2, m, r, seed=14), rnd(2, r, n, seed=15)
        b, a = L.balanced(B, A)
        assert b.shape == (2, m, r) and a.shape == (2, r, n)
        D = B @ A
        assert torch.allclose(b @ a, D, atol=1e-10 * float(D.abs().max()))
        assert torch.allclose(b.mT @ b, a @ a.mT, atol=1e-9 * float(D.norm()))
        k = min(m, n)
        assert float(b[..., k:].abs().max()) == 0.0 and float(a[..., k:, :].abs().max()) == 0.0


def test_pair_products_give_task_and_merged_column_norms():
    """decouple.pair_products: α_t = √Q_tt and the column norms of Σ_t B_t A_t diag(c_t) from
    Σ_st c_s c_t Q_st, against the dense products (unequal ranks, a zero column)."""
    from domerge_core.algebra import decouple as D
    ranks = [3, 5, 2]
    B, A = rnd(2, 17, 10, seed=11), rnd(2, 10, 13, seed=12)
    A[..., 4] = 0.0
    Q = D.pair_products(B.mT @ B, A, ranks)
    assert Q.shape == (2, 3, 3, 13) and torch.equal(Q, Q.transpose(-3, -2))
    parts = [B[..., o:o + r] @ A[..., o:o + r, :] for o, r in L.blocks(ranks)]
    alpha = torch.stack([p.norm(dim=-2) for p in parts], -2)
    assert torch.allclose(D.magnitudes_from_pairs(Q), alpha, rtol=1e-12, atol=1e-12)
    c = rnd(2, 3, 13, seed=13)
    merged = sum(p * c[..., t, :].unsqueeze(-2) for t, p in enumerate(parts))
    assert torch.allclose(D.combined_col_norms(Q, c), merged.norm(dim=-2), rtol=1e-12, atol=1e-12)
    w = torch.tensor([[1.0, -0.5, 0.25]], dtype=A.dtype).expand(2, 3)
    down = D.direction_down(A, alpha, ranks, w)
    direct = D.recombine_scale(B, down, alpha[..., 0, :], "v2", 0.7)
    fast = D.recombine_scale(None, down, alpha[..., 0, :], "v2", 0.7,
                             norms=D.combined_col_norms(Q, D.direction_coefficients(alpha, w)))
    assert torch.allclose(fast, direct, rtol=1e-12, atol=1e-12)
