"""Every merge method against a plain dense float64 reference written here.

The reference follows method.md literally, on dense m×n matrices and the full-size factors: no
QR, no span coordinates, no Gram tricks, explicit loops. The engine runs in float32 (and float64)
through `merge()`; relative errors must stay below 1e-5 in float32.
"""
from __future__ import annotations

import math

import pytest
import torch

from domerge_core.lora import Lora, LoraModule
from domerge_core import merge
from domerge_core.methods import get_method, list_methods
from domerge_core.methods.base import module_seed

torch.set_num_threads(1)

LIN = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.0.resnets.0.conv1"
TE = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
SHAPES = {LIN: (24, 20, None), CONV: (12, 6 * 9, (3, 3)), TE: (30, 16, None)}


def make_loras(T, seed=0, scales=None, ranks=None, corr=0.0, keys=None):
    """T random LoRAs, different ranks and alphas, one linear, one conv 3×3, one text-encoder module."""
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [2 + (i % 4) for i in range(T)]
    scales = scales or [1.0] * T
    common = {k: (torch.randn(m, 8, generator=g, dtype=torch.float64), torch.randn(8, n, generator=g, dtype=torch.float64))
              for k, (m, n, _) in SHAPES.items()}
    out = []
    for i in range(T):
        mods = {}
        for k, (m, n, ks) in SHAPES.items():
            if keys is not None and k not in keys[i]:
                continue
            r = ranks[i]
            up = torch.randn(m, r, generator=g, dtype=torch.float64) * scales[i]
            down = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
            if corr:
                up = (1 - corr) * up + corr * common[k][0][:, :r] * scales[i]
                down = (1 - corr) * down + corr * common[k][1][:r] / math.sqrt(n)
            alpha = float(1 + i)
            if ks is not None:
                down = down.reshape(r, n // 9, 3, 3)
                up = up.reshape(m, r, 1, 1)
            mods[k] = LoraModule.from_tensors(k, up.float(), down.float(), alpha / r)
        out.append(Lora(mods, "kohya", source=f"lora{i}.safetensors"))
    return out


def delta64(mod: LoraModule) -> torch.Tensor:
    up, down = mod.factors(torch.float64)
    return mod.scale * up @ down


def factors64(mod):
    up, down = mod.factors(torch.float64)
    return up * mod.scale, down


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- dense references

def ref_balanced(B, A):
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    return U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]


def ref_orthogonalize(Bs, As, steps, lr, gamma):
    """Normalised gradient descent on the full-size factors, per method.md §1 (gd option)."""
    def run(Xs):                    # Xs: blocks of rows (r_i × d)
        T = len(Xs)
        nrm = [x.norm() for x in Xs]
        Y0 = [x / nx for x, nx in zip(Xs, nrm)]
        s = [(y @ y.T).norm() for y in Y0]
        bound = max(5 * sum(s[j] for j in range(T) if j != i) + (T - 1) * s[i] for i in range(T))
        step = lr / (2 * gamma + bound)
        Y = [y.clone() for y in Y0]
        for _ in range(steps):
            grads = []
            for i in range(T):
                gi = 2 * gamma * (Y[i] - Y0[i])
                for j in range(T):
                    if j != i:
                        gi = gi + 2 * (Y[i] @ Y[j].T) @ Y[j]
                grads.append(gi)
            Y = [y - step * gi for y, gi in zip(Y, grads)]
        return [y * nx for y, nx in zip(Y, nrm)]
    A_hat = run(As)
    B_hat = [b.T for b in run([b.T for b in Bs])]
    return B_hat, A_hat


def ref_col_norms(W):
    return W.norm(dim=0)


def ref_safe_div(x, d):
    tiny = 1e-12 * d.max()
    return torch.where(d > tiny, x / d.clamp_min(1e-300), torch.zeros_like(x))


def ref_trim(x, density):
    if density >= 1:
        return x
    flat = x.flatten()
    k = max(1, int(density * flat.numel()))
    thr = flat.abs().sort(descending=True).values[k - 1]
    return x * (x.abs() >= thr)


def ref_ties_combine(xs, sign_method):
    X = torch.stack(xs)
    s = X.sum(0) if sign_method == "total" else X.sign().sum(0)
    elected = torch.where(s >= 0, 1.0, -1.0).double()
    agree = (X.sign() == elected).double()
    return (X * agree).sum(0) / agree.sum(0).clamp_min(1)


def ref_dare_masks(key, tags, m, n, p, seed):
    out = []
    for tag in tags:
        g = torch.Generator().manual_seed(module_seed(seed, key, tag))
        out.append((torch.rand(m, n, generator=g) >= p).double())
    return out


def reference(loras, method, params, weights, key, seed=0):
    """Dense float64 merged update of one module."""
    p = get_method(method).resolve(params)
    idx = [i for i, l in enumerate(loras) if key in l and weights[i] != 0]
    lam = p["lam"]
    if len(idx) == 1:
        return lam * weights[idx[0]] * delta64(loras[idx[0]][key])
    fs = [factors64(loras[i][key]) for i in idx]
    Bs, As = [f[0] for f in fs], [f[1] for f in fs]
    if p["orthogonalize"]:
        if p["balanced"]:
            Bs, As = map(list, zip(*[ref_balanced(b, a) for b, a in zip(Bs, As)]))
        Bs, As = ref_orthogonalize(Bs, As, p["orth_steps"], p["orth_lr"], p["orth_gamma"])
    Ws = [b @ a for b, a in zip(Bs, As)]
    w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
    if p["decouple"]:
        alphas = [ref_col_norms(W) for W in Ws]
        g = w.abs().max()
        xs = [(w[t] / g) * ref_safe_div(W, alphas[t]) for t, W in enumerate(Ws)]
        aw = w.abs()
        if p["magnitude"] == "weighted_mean":
            a_star = g * sum(aw[t] * alphas[t] for t in range(len(idx))) / aw.sum()
        elif p["magnitude"] == "mean":
            a_star = sum(aw[t] * alphas[t] for t in range(len(idx))) / len(idx)
        else:
            a_star = torch.stack([aw[t] * alphas[t] for t in range(len(idx))]).max(0).values
    else:
        xs = [w[t] * W for t, W in enumerate(Ws)]
    m, n = xs[0].shape
    tags = [loras[i].name for i in idx]
    if method in ("ta", "do"):
        D = sum(xs)
    elif method == "ties":
        D = ref_ties_combine([ref_trim(x, p["density"]) for x in xs], p["sign_method"])
    elif method in ("dare", "dare_ties"):
        masks = ref_dare_masks(key, tags, m, n, p["drop_rate"], seed)
        xs = [x * mk for x, mk in zip(xs, masks)]
        if p["rescale"] and p["drop_rate"] > 0:
            xs = [x / (1 - p["drop_rate"]) for x in xs]
        D = sum(xs) if method == "dare" else ref_ties_combine(xs, p["sign_method"])
    else:
        raise AssertionError(method)
    if p["decouple"]:
        if p["recombine"] == "v1":
            return lam * D * a_star
        return lam * D * ref_safe_div(a_star, D.norm(dim=0))
    return lam * D


def check(loras, method, params, weights, dtype=torch.float32, tol=1e-5, seed=0):
    res = merge(loras, method, params, weights=weights, device="cpu", compute_dtype=dtype, seed=seed,
                rank=None if get_method(method).lowrank else 10 ** 6)
    for key in SHAPES:
        if not any(key in l for l in loras):
            continue
        ref = reference(loras, method, params, weights, key, seed)
        got = delta64(res.lora[key])
        assert got.shape == ref.shape
        assert rel(got, ref) < tol, (method, params, key, rel(got, ref))
    return res


# ----------------------------------------------------------------------------- the tests

CASES = [
    ("ta", {}),
    ("ta", {"decouple": True}),
    ("ta", {"orthogonalize": True}),
    ("do", {}),
    ("do", {"recombine": "v2", "lam": 0.7}),
    ("do", {"magnitude": "mean", "orth_gamma": 0.2, "orth_steps": 12}),
    ("do", {"magnitude": "max", "balanced": False}),
    ("ties", {}),
    ("ties", {"density": 0.3, "sign_method": "frequency", "lam": 1.3}),
    ("ties", {"decouple": True, "orthogonalize": True}),
    ("dare", {}),
    ("dare", {"drop_rate": 0.3, "rescale": False}),
    ("dare", {"orthogonalize": True}),
    ("dare_ties", {}),
    ("dare_ties", {"decouple": True, "sign_method": "frequency"}),
]


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("method,params", CASES)
def test_method_matches_dense_reference_fp32(method, params, T):
    loras = make_loras(T, seed=T, scales=[1.0, 3.0, 0.5, 2.0, 1.0][:T], corr=0.3)
    weights = [1.0, 0.6, -0.4, 1.5, 0.8][:T]
    check(loras, method, params, weights, seed=7)


@pytest.mark.parametrize("method", ["ta", "do", "ties", "dare", "dare_ties"])
def test_method_matches_dense_reference_fp64(method):
    loras = make_loras(3, seed=11, scales=[1.0, 10.0, 0.3])
    check(loras, method, {}, [0.9, 1.0, 1.2], dtype=torch.float64, tol=1e-10)


def test_ta_equals_sum_of_applied_loras():
    """What chained LoRA loaders apply at the same strengths: W0 + Σ w_i s_i B_i A_i."""
    loras = make_loras(4, seed=3)
    w = [0.8, -0.5, 1.2, 0.3]
    res = merge(loras, "ta", weights=w, device="cpu")
    for key in SHAPES:
        ref = sum(wi * delta64(l[key]) for wi, l in zip(w, loras))
        assert rel(delta64(res.lora[key]), ref) < 1e-6
        m = res.lora[key]      # exact at Σ ranks, capped at what the layer holds (then factored exactly)
        assert m.rank == min(sum(l[key].rank for l in loras), m.out_features, m.in_features)


ALL = ["ta", "do", "ties", "dare", "dare_ties"]


@pytest.mark.parametrize("method", ALL)
def test_strength_one_lora_gives_w_delta(method):
    loras = make_loras(2, seed=5)
    for w in (0.7, -1.3):
        res = merge(loras[:1], method, weights=[w], device="cpu")
        for key in SHAPES:
            assert rel(delta64(res.lora[key]), w * delta64(loras[0][key])) < 1e-6
        # a second LoRA at strength 0 changes nothing
        res0 = merge(loras, method, weights=[w, 0.0], device="cpu")
        for key in SHAPES:
            assert rel(delta64(res0.lora[key]), w * delta64(loras[0][key])) < 1e-6


@pytest.mark.parametrize("method", ALL)
def test_strength_scaling_scales_update(method):
    loras = make_loras(3, seed=8, scales=[1.0, 4.0, 0.5], corr=0.4)
    w = [0.5, 1.0, 0.8]
    kw = dict(device="cpu", seed=3, rank=None if get_method(method).lowrank else 10 ** 6)
    base = merge(loras, method, weights=w, **kw)
    for c in (2.5, -0.5):
        scaled = merge(loras, method, weights=[c * x for x in w], **kw)
        for key in SHAPES:
            assert rel(delta64(scaled.lora[key]), c * delta64(base.lora[key])) < 1e-5, (method, c, key)


@pytest.mark.parametrize("method", ALL)
def test_strength_zero_removes_lora(method):
    loras = make_loras(3, seed=9, corr=0.3)
    kw = dict(device="cpu", seed=4, rank=None if get_method(method).lowrank else 10 ** 6)
    with_zero = merge(loras, method, weights=[1.0, 0.0, 0.7], **kw)
    without = merge([loras[0], loras[2]], method, weights=[1.0, 0.7], **kw)
    for key in SHAPES:
        assert rel(delta64(with_zero.lora[key]), delta64(without.lora[key])) < 1e-6, (method, key)


def test_registry_declares_sliders():
    names = [s.name for s in list_methods()]
    for n in ALL:
        assert n in names
    assert get_method("do").defaults()["decouple"] is True
    assert get_method("do").defaults()["orthogonalize"] is True
    assert get_method("ta").defaults()["decouple"] is False
    for spec in list_methods():
        for prm in spec.all_params():
            assert prm.help, (spec.name, prm.name)
            if prm.type in ("float", "int"):
                assert prm.min is not None and prm.max is not None and prm.step is not None, prm.name
            if prm.type == "choice":
                assert prm.default in prm.choices
    plugin = {"decouple", "orthogonalize", "orth_steps", "orth_lr", "orth_gamma", "orth_optimizer", "balanced",
              "magnitude", "recombine"}
    assert plugin <= {p.name for p in get_method("ties").all_params()}


# ----------------------------------------------------------------------------- ranks above a layer dimension

OVER = {"unet.conv_in": (320, 4, (3, 3)),       # SD conv_in: in·kh·kw = 36 < rank 64
        "model.embed": (64, 4, None),           # in_features 4 < ranks up to 8
        "unet.down_blocks.0.attentions.0.proj_in": (40, 30, None)}


def make_over_rank(ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        mods = {}
        for k, (m, c, ks) in OVER.items():
            n = c * 9 if ks else c
            up = torch.randn(m, r, generator=g, dtype=torch.float64) * (1 + i)
            down = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
            if i == 1 and r > 1:
                up[:, 0] = up[:, 1]                      # and a rank-deficient one
            if ks:
                up, down = up.reshape(m, r, 1, 1), down.reshape(r, c, *ks)
            mods[k] = LoraModule.from_tensors(k, up.float(), down.float(), 0.5)
        out.append(Lora(mods, "kohya", source=f"over{i}.safetensors"))
    return out


@pytest.mark.parametrize("ranks", [(1, 2, 4, 8), (64, 32, 8)], ids=["ranks1-8", "rank64"])
@pytest.mark.parametrize("params", [{}, {"balanced": False}, {"recombine": "v2", "lam": 0.8}])
def test_over_rank_loras_match_dense_reference(ranks, params):
    """gd (the default) on LoRAs whose rank exceeds in_features, against the dense float64
    reference: float64 compute tightly; float32 within the balanced form's documented resolution
    (the gram route treats directions below 10·√eps of a factor's largest as null: < 1e-6 of the
    energy, ~1e-3 relative)."""
    loras = make_over_rank(ranks)
    w = [1.0, 0.6, -0.4, 1.5][:len(ranks)]
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 2e-3)):
        res = merge(loras, "do", params, weights=w, device="cpu", compute_dtype=dtype)
        for key in OVER:
            ref = reference(loras, "do", params, w, key)
            assert rel(delta64(res.lora[key]), ref) < tol, (dtype, key, rel(delta64(res.lora[key]), ref))


@pytest.mark.parametrize("ranks", [(1, 2, 4, 8), (64, 32, 8)], ids=["ranks1-8", "rank64"])
def test_adam_handles_ranks_above_the_layer_width(ranks):
    """orth_optimizer=adam used to fail with a shape error when a LoRA's rank exceeds in_features
    (the balanced form returned min(r, n) rows). Now it merges; at 0 steps it is the dense
    reference exactly (the optimizer does not matter there), and with steps it lowers the
    reported interference, whose numbers are the dense ones."""
    loras = make_over_rank(ranks)
    w = [1.0, 0.6, -0.4, 1.5][:len(ranks)]
    p0 = {"orth_optimizer": "adam", "orth_steps": 0}
    res0 = merge(loras, "do", p0, weights=w, device="cpu", compute_dtype=torch.float64)
    for key in OVER:
        assert rel(delta64(res0.lora[key]), reference(loras, "do", p0, w, key)) < 1e-9
    res = merge(loras, "do", {"orth_optimizer": "adam", "orth_steps": 30}, weights=w, device="cpu")
    for key in OVER:
        rec = res.report["modules"][key]
        P = [delta64(l[key]) for l in loras]
        for i in range(len(P)):
            for j in range(len(P)):
                c = float((P[i] * P[j]).sum() / (P[i].norm() * P[j].norm()))
                assert abs(rec["cos_before"][i][j] - c) < 1e-4
        assert torch.isfinite(delta64(res.lora[key])).all()
    d = res.report["diagnostics"]
    assert d["mean_abs_cos_after"] < d["mean_abs_cos_before"]


def test_adam_reproducer_from_the_issue():
    torch.manual_seed(0)
    mk = lambda r: Lora({"model.embed": LoraModule.from_tensors("model.embed", torch.randn(64, r),  # noqa: E731
                                                                torch.randn(r, 4))}, "peft")
    res = merge([mk(r) for r in (1, 2, 4, 8)], method="do", params={"orth_optimizer": "adam"}, device="cpu")
    assert res.lora["model.embed"].rank == 4          # Σ ranks 15, capped at the layer's in_features (exact)
    assert res.report["modules"]["model.embed"]["rel_error"] < 1e-5
