"""The aligned low-rank methods (KnOTS, Core Space, TSV-M, Iso-C, Iso-CTS, CART) against plain dense
float64 references written here from the papers' equations: full m×n updates, full SVDs, explicit
loops, no QR / Gram / span-coordinate tricks. The engine runs them through `merge()` in float32
(and float64) on T = 2..5 LoRAs of mixed ranks, with a linear, a conv 3×3 and a text-encoder module.
"""
from __future__ import annotations

import math

import pytest
import torch

from domerge_core import merge
from domerge_core.methods import get_method
from domerge_core.methods.base import TaskSet, MethodContext, module_seed
from test_methods import (SHAPES, delta64, factors64, make_loras, ref_balanced, ref_col_norms, ref_dare_masks,
                          ref_orthogonalize, ref_safe_div, ref_ties_combine, ref_trim, rel)

torch.set_num_threads(1)

NEW = ["knots_ties", "knots_dare_ties", "knots_dare", "core_ties", "core_dare", "core_dare_ties",
       "tsv", "iso_c", "iso_cts", "cart"]


# ----------------------------------------------------------------------------- dense references

def svd(x):
    return torch.linalg.svd(x, full_matrices=False)


def nrank(S, rtol=1e-9):
    return int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0


def canon(U):
    """Columns signed so their inner product with the engine's fixed probe vector is positive (its
    deterministic SVD sign gauge, `linalg.probe_signs`)."""
    g = torch.randn(U.shape[0], generator=torch.Generator().manual_seed(20250515), dtype=torch.float64)
    return U * torch.where(g @ U < 0, -1.0, 1.0)


def ref_polar(X):
    U, _, Vh = svd(X)
    return U @ Vh


def ref_masks(key, tags, shape, p, seed, salt):
    out = []
    for tag in tags:
        g = torch.Generator().manual_seed(module_seed(seed, key, tag + salt))
        out.append((torch.rand(*shape, generator=g) >= p).double())
    return out


def ref_entrywise(xs, how, p, key, tags, seed, salt):
    """TIES / DARE / DARE-TIES / trimmed TA on equal-shape blocks, written out."""
    if how in ("dare", "dare_ties"):
        if p["drop_rate"] > 0:
            masks = ref_masks(key, tags, xs[0].shape, p["drop_rate"], seed, salt)
            xs = [x * mk for x, mk in zip(xs, masks)]
            if p["rescale"]:
                xs = [x / (1 - p["drop_rate"]) for x in xs]
        return sum(xs) if how == "dare" else ref_ties_combine(xs, p["sign_method"])
    xs = [ref_trim(x, p.get("density", 1.0)) for x in xs]
    return sum(xs) if how == "ta" else ref_ties_combine(xs, p["sign_method"])


def ref_knots(xs, how, p, key, tags, seed):
    """KnOTS eq. 2–3: SVD of [ΔW_1 … ΔW_T], merge the blocks Σ V_iᵀ, map back with U."""
    m, n = xs[0].shape
    U, S, Vh = svd(torch.cat(xs, 1))
    k = nrank(S)
    U = canon(U[:, :k])
    reps = [U.T @ x for x in xs]                      # = Σ V_iᵀ in the gauge of U
    return U @ ref_entrywise(reps, how, p, key, tags, seed, "#knots")


def ref_core(xs, ranks, how, p, key, tags, seed):
    """Core Space eq. 4–6 with the bases of the balanced factors: M_i = U_Bᵀ ΔW_i V_A."""
    m, n = xs[0].shape
    Bs, As = [], []
    for x, r in zip(xs, ranks):
        U, S, Vh = svd(x)
        r_eff = min(r, S.numel())
        b = U[:, :r_eff] * S[:r_eff].sqrt()
        a = S[:r_eff].sqrt()[:, None] * Vh[:r_eff]
        Bs.append(torch.cat([b, torch.zeros(m, r - r_eff, dtype=x.dtype)], 1))
        As.append(torch.cat([a, torch.zeros(r - r_eff, n, dtype=x.dtype)], 0))
    R = sum(ranks)
    UB = canon(svd(torch.cat(Bs, 1))[0][:, :min(m, R)])
    VA = canon(svd(torch.cat(As, 0))[2][:min(n, R)].T)
    cores = [UB.T @ x @ VA for x in xs]
    return UB @ ref_entrywise(cores, how, p, key, tags, seed, "#core") @ VA.T


def ref_tsv(xs):
    """TSV-M eq. 8: per-task top-k triplets, whitened U and V, own singular values."""
    m, n = xs[0].shape
    T = len(xs)
    Us, Ss, Vs = [], [], []
    for x in xs:
        U, S, Vh = svd(x)
        k = min(nrank(S), min(m, n) // T)
        Us.append(U[:, :k]), Ss.append(S[:k]), Vs.append(Vh[:k].T)
    U, S, V = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    return ref_polar(U) @ torch.diag(S) @ ref_polar(V).T


def ref_iso_c(xs):
    U, S, Vh = svd(sum(xs))
    k = nrank(S)
    return S[:k].mean() * U[:, :k] @ Vh[:k]


def ref_iso_cts(xs, ranks, frac):
    """Iso-CTS Alg. 2 in the span of dimension D = min(m, n, R)."""
    m, n = xs[0].shape
    T = len(xs)
    D = min(m, n, sum(ranks))
    k = int(D * frac)
    s = int(round((D - k) / T))
    if s * T > D:
        s = D // T
    k = D - s * T
    U, S, Vh = svd(sum(xs))
    Uc = U[:, :k]
    Ucols, Svals, Vrows = [], [], []
    for x in xs:
        u, sv, vh = svd(x - Uc @ Uc.T @ x)
        j = min(s, nrank(sv))
        Ucols.append(u[:, :j]), Svals.append(sv[:j]), Vrows.append(vh[:j])
    Ucols.append(Uc), Svals.append(S[:k]), Vrows.append(Vh[:k])
    Uall, Sall, Vall = torch.cat(Ucols, 1), torch.cat(Svals), torch.cat(Vrows, 0)
    return Sall.mean() * ref_polar(Uall) @ ref_polar(Vall.T).T


def ref_cart(xs, ranks, frac, scale):
    m, n = xs[0].shape
    k = max(1, math.ceil(frac * min(m, n, sum(ranks))))
    avg = sum(xs) / len(xs)
    out = avg.clone()
    for x in xs:
        U, S, Vh = svd(x - avg)
        out = out + scale * U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return out


def prepared(loras, p, weights, key):
    """The tasks as the methods see them (plug-ins applied), dense: (xs, ranks, tags, a_star)."""
    idx = [i for i, l in enumerate(loras) if key in l and weights[i] != 0]
    fs = [factors64(loras[i][key]) for i in idx]
    Bs, As = [f[0] for f in fs], [f[1] for f in fs]
    if p["orthogonalize"]:
        if p["balanced"]:
            Bs, As = map(list, zip(*[ref_balanced(b, a) for b, a in zip(Bs, As)]))
        Bs, As = ref_orthogonalize(Bs, As, p["orth_steps"], p["orth_lr"], p["orth_gamma"])
    Ws = [b @ a for b, a in zip(Bs, As)]
    w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
    a_star = None
    if p["decouple"]:
        alphas = [ref_col_norms(W) for W in Ws]
        g = w.abs().max()
        xs = [(w[t] / g) * ref_safe_div(W, alphas[t]) for t, W in enumerate(Ws)]
        aw = w.abs()
        assert p["magnitude"] == "weighted_mean"
        a_star = g * sum(aw[t] * alphas[t] for t in range(len(idx))) / aw.sum()
    else:
        xs = [w[t] * W for t, W in enumerate(Ws)]
    return xs, [loras[i][key].rank for i in idx], [loras[i].name for i in idx], a_star, idx


def reference(loras, method, params, weights, key, seed=0):
    p = get_method(method).resolve(params)
    xs, ranks, tags, a_star, idx = prepared(loras, p, weights, key)
    if len(idx) == 1:
        return p["lam"] * weights[idx[0]] * delta64(loras[idx[0]][key])
    if method.startswith("knots_"):
        D = ref_knots(xs, method[6:], p, key, tags, seed)
    elif method.startswith("core_"):
        D = ref_core(xs, ranks, method[5:], p, key, tags, seed)
    elif method == "tsv":
        D = ref_tsv(xs)
    elif method == "iso_c":
        D = ref_iso_c(xs)
    elif method == "iso_cts":
        D = ref_iso_cts(xs, ranks, p["common_fraction"])
    elif method == "cart":
        D = ref_cart(xs, ranks, p["rank_fraction"], p["cart_scale"])
    else:
        raise AssertionError(method)
    if p["decouple"]:
        if p["recombine"] == "v1":
            return p["lam"] * D * a_star
        return p["lam"] * D * ref_safe_div(a_star, D.norm(dim=0))
    return p["lam"] * D


def check(loras, method, params, weights, dtype=torch.float32, tol=1e-5, seed=0):
    res = merge(loras, method, params, weights=weights, device="cpu", compute_dtype=dtype, seed=seed)
    for key in SHAPES:
        if not any(key in l for l in loras):
            continue
        ref = reference(loras, method, params, weights, key, seed)
        got = delta64(res.lora[key])
        assert got.shape == ref.shape
        assert rel(got, ref) < tol, (method, params, key, rel(got, ref))
        assert res.lora[key].rank <= sum(l[key].rank for l in loras if key in l)
    return res


# ----------------------------------------------------------------------------- against the references

CASES = [
    ("knots_ties", {}),
    ("knots_ties", {"density": 0.6, "sign_method": "frequency", "lam": 1.3}),
    ("knots_ties", {"decouple": True, "orthogonalize": True}),
    ("knots_dare_ties", {}),
    ("knots_dare_ties", {"drop_rate": 0.4, "rescale": False}),
    ("knots_dare", {"drop_rate": 0.3}),
    ("core_ties", {}),
    ("core_ties", {"density": 0.7, "sign_method": "frequency"}),
    ("core_ties", {"orthogonalize": True}),
    ("core_dare", {}),
    ("core_dare_ties", {"drop_rate": 0.2}),
    ("core_dare_ties", {"decouple": True}),
    ("tsv", {}),
    ("tsv", {"decouple": True, "lam": 0.8}),
    ("iso_c", {}),
    ("iso_c", {"orthogonalize": True}),
    ("iso_cts", {}),
    ("iso_cts", {"common_fraction": 0.5}),
    ("iso_cts", {"common_fraction": 1.0}),
    ("cart", {}),
    ("cart", {"rank_fraction": 0.4, "cart_scale": 0.5}),
    ("cart", {"decouple": True, "recombine": "v2"}),
]


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("method,params", CASES)
def test_aligned_method_matches_dense_reference(method, params, T):
    """float64 compute: exact (1e-10). float32: 1e-4 for the continuous merges; the sign-electing
    ones (TIES, DARE-TIES) in an SVD basis are discontinuous where an entry's vote sums to ≈ 0,
    and float32 rounding of the basis (≈ eps·‖B‖/gap of the stacked factors' singular values)
    can flip such an election, so there only a few-percent bound."""
    loras = make_loras(T, seed=T, scales=[1.0, 3.0, 0.5, 2.0, 1.0][:T], corr=0.3)
    weights = [1.0, 0.6, -0.4, 1.5, 0.8][:T]
    check(loras, method, params, weights, dtype=torch.float64, tol=1e-10, seed=7)
    # float32: subspaces / bases split at a singular-value gap carry ≈ eps·‖ΔW‖/gap of rounding
    tol = 5e-2 if method.endswith("ties") else 1e-4
    check(loras, method, params, weights, seed=7, tol=tol)


@pytest.mark.parametrize("method", NEW)
def test_aligned_method_matches_dense_reference_fp64(method):
    loras = make_loras(3, seed=11, scales=[1.0, 10.0, 0.3], ranks=[4, 2, 6])
    check(loras, method, {}, [0.9, 1.0, 1.2], dtype=torch.float64, tol=1e-10)


def test_some_modules_missing_from_some_loras():
    keys = [set(SHAPES), {next(iter(SHAPES))}, set(list(SHAPES)[1:])]
    loras = make_loras(3, seed=4, keys=keys)
    for method in ("knots_ties", "core_dare_ties", "tsv", "iso_cts", "cart"):
        check(loras, method, {}, [1.0, 0.7, 1.2], dtype=torch.float64, tol=1e-10, seed=2)
        check(loras, method, {}, [1.0, 0.7, 1.2], seed=2, tol=5e-2 if method.endswith("ties") else 1e-4)


# ----------------------------------------------------------------------------- equivalences the papers state

def _taskset(loras, key, weights):
    ups, downs, ranks = [], [], []
    for l, w in zip(loras, weights):
        b, a = factors64(l[key])
        ups.append(w * b), downs.append(a), ranks.append(l[key].rank)
    return TaskSet(torch.cat(ups, -1)[None], torch.cat(downs, -2)[None], ranks, [key],
                   list(range(len(loras))), [l.name for l in loras])


@pytest.mark.parametrize("key", list(SHAPES))
def test_linear_merges_are_task_arithmetic_in_every_aligned_space(key):
    """KnOTS-TA and Core-TA (no trim) are exactly TA: both alignments are lossless."""
    from domerge_core.methods.core import core_merge
    from domerge_core.methods.knots import knots_merge
    loras = make_loras(4, seed=21)
    ts = _taskset(loras, key, [1.0, -0.5, 2.0, 0.3])
    ctx = MethodContext(0, torch.device("cpu"), torch.float64)
    ta = ts.up @ ts.down
    for fn in (knots_merge, core_merge):
        u = fn(ts, {"density": 1.0}, ctx, "ta")
        assert rel(u.up @ u.down, ta) < 1e-12


@pytest.mark.parametrize("key", list(SHAPES))
def test_core_space_tsv_is_tsv(key):
    """TSV-M run on the Core Space cores and mapped back equals TSV-M on the updates (equal ranks)."""
    from domerge_core.methods.spaces import core_space
    from domerge_core.methods.tsv import tsv
    loras = make_loras(3, seed=22, ranks=[3, 3, 3])
    ts = _taskset(loras, key, [1.0, 0.5, 1.5])
    ctx = MethodContext(0, torch.device("cpu"), torch.float64)
    Qb, Ub, Qa, Va, cores = core_space(ts)
    UB, VA = Qb @ Ub, Qa @ Va
    eye = [torch.eye(c.shape[-1], dtype=c.dtype)[None] for c in cores]
    cts = TaskSet(torch.cat(list(cores), -1), torch.cat(eye, -2), [c.shape[-1] for c in cores], ts.keys,
                  ts.inputs, ts.tags)
    in_core = tsv(cts, {}, ctx)
    direct = tsv(ts, {}, ctx)
    assert rel(UB @ in_core.up @ in_core.down @ VA.transpose(-1, -2), direct.up @ direct.down) < 1e-10


def test_core_space_does_not_depend_on_the_factor_split():
    """Moving scale between up and down (B g, A / g) leaves every aligned method unchanged."""
    loras = make_loras(3, seed=23)
    ctx = MethodContext(5, torch.device("cpu"), torch.float64)
    for key in SHAPES:
        ts = _taskset(loras, key, [1.0, 0.7, 1.3])
        g = torch.linspace(0.2, 5.0, ts.up.shape[-1], dtype=torch.float64)
        ts2 = TaskSet(ts.up * g, ts.down / g[:, None], ts.ranks, ts.keys, ts.inputs, ts.tags)
        for name in NEW:
            p = get_method(name).resolve({})
            a, b = get_method(name).fn(ts, p, ctx), get_method(name).fn(ts2, p, ctx)
            assert rel(b.up @ b.down, a.up @ a.down) < 1e-9, (name, key)


# ----------------------------------------------------------------------------- strengths

@pytest.mark.parametrize("method", NEW)
def test_strength_one_lora_gives_w_delta(method):
    loras = make_loras(2, seed=5)
    for w in (0.7, -1.3):
        res = merge(loras[:1], method, weights=[w], device="cpu")
        for key in SHAPES:
            assert rel(delta64(res.lora[key]), w * delta64(loras[0][key])) < 1e-6
        res0 = merge(loras, method, weights=[w, 0.0], device="cpu")
        for key in SHAPES:
            assert rel(delta64(res0.lora[key]), w * delta64(loras[0][key])) < 1e-6


@pytest.mark.parametrize("method", NEW)
def test_strength_scaling_scales_update(method):
    """Every aligned method is homogeneous of degree one in the strengths, negative c included
    (TIES/DARE are sign-gauge invariant in the aligned bases; TSV/Iso/CART scale their spectra)."""
    loras = make_loras(3, seed=8, scales=[1.0, 4.0, 0.5], corr=0.4)
    w = [0.5, 1.0, 0.8]
    kw = dict(device="cpu", seed=3, compute_dtype=torch.float64)      # a property of the maths: no rounding
    base = merge(loras, method, weights=w, **kw)
    for c in (2.5, -0.5):
        scaled = merge(loras, method, weights=[c * x for x in w], **kw)
        for key in SHAPES:
            assert rel(delta64(scaled.lora[key]), c * delta64(base.lora[key])) < 1e-9, (method, c, key)


@pytest.mark.parametrize("method", NEW)
def test_strength_zero_removes_lora(method):
    loras = make_loras(3, seed=9, corr=0.3)
    with_zero = merge(loras, method, weights=[1.0, 0.0, 0.7], device="cpu", seed=4)
    without = merge([loras[0], loras[2]], method, weights=[1.0, 0.7], device="cpu", seed=4)
    for key in SHAPES:
        assert rel(delta64(with_zero.lora[key]), delta64(without.lora[key])) < 1e-6, (method, key)


def test_registry_entries():
    for name in NEW:
        spec = get_method(name)
        assert spec.lowrank, name
        assert spec.label and spec.description
        for prm in spec.params:
            assert prm.help
    # one ComfyUI widget per parameter name: a shared name keeps one default across methods
    for name in ("density", "drop_rate", "sign_method", "rescale", "lam"):
        ds = {repr(get_method(m).defaults()[name]) for m in NEW + ["ties", "dare", "dare_ties"]
              if name in get_method(m).defaults()}
        assert len(ds) == 1, (name, ds)
    assert get_method("iso_cts").defaults()["common_fraction"] == 0.8


# ----------------------------------------------------------------------------- output truncation (SVD-form path)

def ref_truncate(D, k=None, energy=None):
    U, S, Vh = svd(D)
    if energy is not None:
        frac = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        k2 = int((frac < energy - 1e-12).sum()) + 1
        k = k2 if k is None else min(k, k2)
    k = min(k, S.numel())
    err = float((S[k:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt())
    return U[:, :k] * S[:k] @ Vh[:k], k, err


@pytest.mark.parametrize("method", NEW)
def test_rank_and_energy_truncation_are_eckart_young(method):
    """The methods hand the door their exact SVD; slicing it must give the best rank-k / energy
    factorisation of the merge, with the exact reported error and balanced factors."""
    loras = make_loras(3, seed=12, scales=[1.0, 2.0, 0.5])
    w = [1.0, 0.8, 1.1]
    for kw in ({"rank": 4}, {"energy": 0.9}, {"rank": 6, "energy": 0.95}):
        res = merge(loras, method, weights=w, device="cpu", compute_dtype=torch.float64, seed=1, **kw)
        for key in SHAPES:
            full = reference(loras, method, {}, w, key, seed=1)
            ref, k, err = ref_truncate(full, kw.get("rank"), kw.get("energy"))
            mod = res.lora[key]
            assert mod.rank == k, (method, kw, key)
            if method.startswith("iso"):
                # a flat spectrum has no unique best rank-k part: k directions at the mean value
                sv = torch.linalg.svdvals(delta64(mod))[:k]
                assert torch.allclose(sv, torch.linalg.svdvals(full)[:1].expand(k), rtol=1e-9)
                if method == "iso_c":       # the k strongest directions of the summed LoRAs
                    xs = prepared(loras, get_method(method).resolve({}), w, key)[0]
                    U, _, Vh = svd(sum(xs))
                    assert rel(delta64(mod), sv[0] * U[:, :k] @ Vh[:k]) < 1e-9
            else:
                assert rel(delta64(mod), ref) < 1e-9, (method, kw, key)
            assert abs(res.report["modules"][key]["rel_error"] - err) < 1e-9
            up, down = mod.factors(torch.float64)
            assert torch.allclose(up.reshape(up.shape[0], -1).norm(dim=0), down.reshape(down.shape[0], -1).norm(dim=1))


def test_numpy_trim_is_magnitude_trim():
    from domerge_core.methods.base import magnitude_trim
    from domerge_core.methods.spaces import trim
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 4, 9, 13, generator=g)
    X[0, 0, :3] = 0.5                                    # ties at a threshold
    for d in (0.01, 0.3, 0.5, 0.99, 1.0):
        assert torch.equal(trim(X, d), magnitude_trim(X, d))


def test_one_pass_ties_mean_is_elect_sign_and_disjoint_mean():
    from domerge_core.methods.base import disjoint_mean, elect_sign
    from domerge_core.methods.spaces import ties_mean, trim
    g = torch.Generator().manual_seed(4)
    X = trim(torch.randn(4, 3, 7, 9, generator=g, dtype=torch.float64), 0.5)
    X[:, 0, 0, 0] = torch.tensor([1.0, -1.0, 0.0, 0.0])          # a vote tie and zeros
    for m in ("total", "frequency"):
        assert torch.equal(ties_mean(X, m), disjoint_mean(X, elect_sign(X, m)))
