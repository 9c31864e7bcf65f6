"""The merge door: alignment, truncation, determinism, progress/cancel, cache, files, decouple."""
from __future__ import annotations

import os
import json
import math

import pytest
import torch

from domerge_core import MergeCache
from domerge_core.errors import IncompatibleLorasError, InvalidParameterError, MergeCancelled
from domerge_core.lora import Lora, LoraModule
from domerge_core import MergeResult, merge

torch.set_num_threads(1)

LIN = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
LIN2 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
CONV = "unet.down_blocks.0.resnets.0.conv1"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {LIN: (40, 32, None), LIN2: (40, 32, None), CONV: (16, 8 * 9, (3, 3)), TE: (24, 24, None)}
ALL = ["ta", "do", "ties", "dare", "dare_ties"]


def make(T=3, seed=0, keys=None, scales=None, corr=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    common = {k: (torch.randn(m, 6, generator=g), torch.randn(6, n, generator=g)) for k, (m, n, _) in SHAPES.items()}
    out = []
    for i in range(T):
        mods = {}
        for k, (m, n, ks) in SHAPES.items():
            if keys is not None and k not in keys[i]:
                continue
            r = 3 + i
            up = (1 - corr) * torch.randn(m, r, generator=g) + corr * common[k][0][:, :r]
            down = ((1 - corr) * torch.randn(r, n, generator=g) + corr * common[k][1][:r]) / math.sqrt(n)
            up = up * (scales or [1.0] * T)[i]
            if ks:
                up, down = up.reshape(m, r, 1, 1), down.reshape(r, n // 9, 3, 3)
            mods[k] = LoraModule.from_tensors(k, up.to(dtype), down.to(dtype), 2.0 / r)
        out.append(Lora(mods, "kohya", source=f"in{i}.safetensors", dtype=dtype, layout={"unet_names": "sgm"}))
    return out


def d64(mod):
    up, down = mod.factors(torch.float64)
    return mod.scale * up @ down


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_result_shape_and_report():
    loras = make()
    res = merge(loras, "do", device="cpu")
    assert isinstance(res, MergeResult)
    assert res.lora.format == "merged" and res.lora.layout["unet_names"] == "sgm"
    assert list(res.lora.modules) == list(SHAPES)
    for k, m in res.lora.modules.items():
        assert m.scale == 1.0 and m.key == k
        assert m.rank == sum(l[k].rank for l in loras)
    assert res.lora[CONV].kind == "conv" and res.lora[CONV].kernel_size == (3, 3)
    assert res.weights == [1.0, 1.0, 1.0] and res.params["decouple"] and res.params["orthogonalize"]
    rep = json.loads(json.dumps(res.report))
    assert rep["summary"]["modules"] == 4
    assert set(rep["modules"][LIN]) >= {"rank", "rel_error", "cos_before", "cos_after", "rel_delta_A", "rel_delta_B"}
    assert rep["diagnostics"]["mean_abs_cos_after"] <= rep["diagnostics"]["mean_abs_cos_before"]


def test_module_missing_from_some_loras_is_merged_over_those_that_have_it():
    keys = [set(SHAPES), {LIN, CONV, TE}, {LIN, TE}]
    loras = make(keys=keys)
    w = [0.7, 1.2, 0.9]
    for method in ("ta", "do"):
        res = merge(loras, method, weights=w, device="cpu")
        assert set(res.lora.modules) == set(SHAPES)
        # LIN2 only in input 0: λ·w·ΔW
        assert rel(d64(res.lora[LIN2]), 0.7 * d64(loras[0][LIN2])) < 1e-6
        # CONV in inputs 0 and 1: the same as merging those two alone
        pair = merge(loras[:2], method, weights=w[:2], device="cpu")
        assert rel(d64(res.lora[CONV]), d64(pair.lora[CONV])) < 1e-6
        assert res.report["modules"][CONV]["inputs"] == [0, 1]


def test_all_zero_strength_module_is_left_out():
    loras = make(T=2, keys=[{LIN}, {LIN, TE}])
    res = merge(loras, "ta", weights=[1.0, 0.0], device="cpu")
    assert set(res.lora.modules) == {LIN}
    assert res.report["skipped"] == [TE]


def test_errors_name_file_and_key():
    a = make(T=1)[0]
    bad = LoraModule.from_tensors(LIN, torch.randn(41, 3), torch.randn(3, 32), 1.0)
    b = Lora({LIN: bad}, "kohya", source="other.safetensors")
    with pytest.raises(IncompatibleLorasError) as e:
        merge([a, b], "ta", device="cpu")
    assert "other.safetensors" in str(e.value) and LIN in str(e.value)
    with pytest.raises(InvalidParameterError):
        merge([a, a], "ta", weights=[1.0], device="cpu")
    with pytest.raises(InvalidParameterError):
        merge([a, a], "nope", device="cpu")
    with pytest.raises(InvalidParameterError):
        merge([a, a], "ties", {"density": 2.0}, device="cpu")
    with pytest.raises(InvalidParameterError):
        merge([a, a], "ta", {"drop_rate": 0.1}, device="cpu")
    with pytest.raises(InvalidParameterError):
        merge([a, a], "ta", rank=0, device="cpu")
    with pytest.raises(InvalidParameterError):
        merge([a, a], "ta", energy=1.5, device="cpu")


@pytest.mark.parametrize("method", ["ta", "do"])
@pytest.mark.parametrize("k", [1, 5, 9])
def test_rank_truncation_error_is_tail_energy_of_dense_reference(method, k):
    loras = make(corr=0.3)
    w = [1.0, 0.5, -0.8]
    exact = merge(loras, method, weights=w, device="cpu", compute_dtype=torch.float64)
    trunc = merge(loras, method, weights=w, device="cpu", rank=k)
    for key in SHAPES:
        D = d64(exact.lora[key]) if method == "do" else sum(wi * d64(l[key]) for wi, l in zip(w, loras))
        S = torch.linalg.svdvals(D)
        tail = math.sqrt(float((S[k:] ** 2).sum() / (S ** 2).sum()))
        got = trunc.lora[key]
        assert got.rank == min(k, len(S))
        assert abs(rel(d64(got), D) - tail) < 1e-4 * max(tail, 1e-3) + 1e-6, (key, rel(d64(got), D), tail)
        assert abs(trunc.report["modules"][key]["rel_error"] - tail) < 1e-4 * max(tail, 1e-3) + 1e-6


def test_energy_truncation():
    loras = make(corr=0.2)
    res = merge(loras, "ta", energy=0.95, device="cpu")
    for key in SHAPES:
        D = sum(d64(l[key]) for l in loras)
        S = torch.linalg.svdvals(D)
        frac = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        k = int((frac < 0.95).sum()) + 1
        assert res.lora[key].rank == k
        assert res.report["modules"][key]["rel_error"] <= math.sqrt(0.05) + 1e-6


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_dense_methods_truncate_with_exact_reported_error(method):
    loras = make(corr=0.3)
    full = merge(loras, method, device="cpu", rank=10 ** 6, seed=2)
    trunc = merge(loras, method, device="cpu", rank=4, seed=2)
    for key in SHAPES:
        D = d64(full.lora[key])
        S = torch.linalg.svdvals(D)
        tail = math.sqrt(float((S[4:] ** 2).sum() / (S ** 2).sum()))
        actual = rel(d64(trunc.lora[key]), D)
        assert abs(trunc.report["modules"][key]["rel_error"] - actual) < 1e-5
        assert actual < tail + 1e-4           # (near) optimal rank-4 approximation


@pytest.mark.parametrize("method", ALL)
def test_deterministic_bit_identical(method):
    loras = make(corr=0.3)
    a = merge(loras, method, device="cpu", seed=5)
    b = merge(loras, method, device="cpu", seed=5)
    for key in SHAPES:
        ua, da = a.lora[key].factors()
        ub, db = b.lora[key].factors()
        assert torch.equal(ua, ub) and torch.equal(da, db)
    if method.startswith("dare"):
        c = merge(loras, method, device="cpu", seed=6)
        assert not torch.equal(c.lora[LIN].factors()[1], a.lora[LIN].factors()[1])


def test_saved_files_are_bit_identical_and_round_trip(tmp_path):
    from domerge_core.formats import load_lora, save_lora
    loras = make(T=2, dtype=torch.float16)
    paths = []
    for i, l in enumerate(loras):
        paths.append(save_lora(l, str(tmp_path / f"in{i}.safetensors"), format="kohya"))
    res = merge(paths, "do", device="cpu")                       # file paths as inputs
    mem = merge([load_lora(p) for p in paths], "do", device="cpu")
    o1 = res.save(str(tmp_path / "o1.safetensors"))
    o2 = mem.save(str(tmp_path / "o2.safetensors"))
    # bit-identical files (the writer sorts keys and metadata: safetensors' own save_file orders
    # metadata by a hash map), which safetensors reads back
    with open(o1, "rb") as f1, open(o2, "rb") as f2:
        assert f1.read() == f2.read()
    from safetensors import safe_open
    with safe_open(o1, "pt") as f1, safe_open(o2, "pt") as f2:
        assert f1.metadata() == f2.metadata()
        assert sorted(f1.keys()) == sorted(f2.keys())
        for k in f1.keys():
            assert torch.equal(f1.get_tensor(k), f2.get_tensor(k))
    back = load_lora(o1)
    for key in SHAPES:
        assert rel(d64(back[key]), d64(res.lora[key])) < 2e-3      # written in fp16 (the inputs' dtype)
    from domerge_core.errors import OutputExistsError
    with pytest.raises(OutputExistsError):
        res.save(o1)
    sd, md = res.state_dict(format="peft")
    assert any(k.endswith("lora_A.weight") for k in sd) and "domerge" in md


def test_cli_merges_are_bit_identical_across_processes(tmp_path):
    """Two separate `domerge merge` processes (fresh hash seeds) write the same bytes."""
    import hashlib
    import subprocess
    import sys
    from domerge_core.formats import save_lora
    paths = [save_lora(l, str(tmp_path / f"in{i}.safetensors"), format="kohya")
             for i, l in enumerate(make(T=3, dtype=torch.float16))]
    digests = []
    for run in range(2):
        out = tmp_path / f"out{run}.safetensors"
        r = subprocess.run([sys.executable, "-m", "domerge_core", "merge", *paths, "-o", str(out),
                            "--method", "dare_ties", "--seed", "3", "--weights", "0.5,1,-0.7", "-q"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(run)})
        assert r.returncode == 0, r.stderr
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_progress_stages_and_cancellation():
    loras = make(corr=0.3)
    seen = []
    merge(loras, "do", device="cpu", rank=4, progress=lambda d, t, s: seen.append((d, t, s)))
    stages = {s for _, _, s in seen}
    assert stages == {"orthogonalize", "merge", "truncate"}
    for st in stages:
        done = [d for d, _, s in seen if s == st]
        assert done == list(range(1, len(SHAPES) + 1))
    assert all(t == len(SHAPES) for _, t, _ in seen)

    calls = []

    def cancel(done, total, stage):
        calls.append(stage)
        if len(calls) == 2:
            raise MergeCancelled("cancelled by user")

    with pytest.raises(MergeCancelled):
        merge(loras, "ta", device="cpu", progress=cancel)


@pytest.mark.parametrize("method", ["do", "ties"])
def test_cache_reuse_matches_fresh_merge(method):
    loras = make(corr=0.4)
    cache = MergeCache()
    params = {"orthogonalize": True, "decouple": True}
    merge(loras, method, params, weights=[1.0, 1.0, 1.0], device="cpu", cache=cache)
    misses = cache.misses
    for w, extra in (([0.3, 2.0, -1.0], {}), ([1.0, 0.5, 0.5], {"lam": 0.7, "recombine": "v2"})):
        p = {**params, **extra}
        cached = merge(loras, method, p, weights=w, device="cpu", cache=cache)
        fresh = merge(loras, method, p, weights=w, device="cpu")
        for key in SHAPES:
            for x, y in zip(cached.lora[key].factors(), fresh.lora[key].factors()):
                assert torch.equal(x, y)
    assert cache.misses == misses and cache.hits > 0
    merge(loras, method, {**params, "orth_gamma": 2.0}, device="cpu", cache=cache)
    assert cache.misses > misses          # new orthogonalization options: a new descent


def test_decouple_stops_a_x10_lora_from_dominating():
    """Measured: cosine of the merged update with each input's update."""
    loras = make(corr=0.0, scales=[10.0, 1.0, 1.0], seed=3)

    def cosines(res):
        out = []
        for l in loras:
            num = den_a = den_b = 0.0
            for key in SHAPES:
                a, b = d64(res.lora[key]), d64(l[key])
                num += float((a * b).sum())
                den_a += float((a * a).sum())
                den_b += float((b * b).sum())
            out.append(num / math.sqrt(den_a * den_b))
        return out

    ta = cosines(merge(loras, "ta", device="cpu"))
    do = cosines(merge(loras, "do", device="cpu"))
    dec = cosines(merge(loras, "ta", {"decouple": True}, device="cpu"))
    assert ta[0] > 0.95 and max(ta[1:]) < 0.2                 # task arithmetic: the ×10 LoRA dominates
    for c in (do, dec):
        assert min(c) / max(c) > 0.7, c                        # decoupled: every LoRA is represented
        assert c[0] < 0.8


# ----------------------------------------------------------------------------- numerical failures

def _poisoned(value, key=LIN2, victim=1, dtype=torch.float32):
    """Three in-memory LoRAs (no reader checks) with one entry of ``victim``'s up in ``key`` set to
    ``value``. LIN and LIN2 have the same shape, so they are batched together: the error must still
    name the right module."""
    loras = make(T=3, seed=4, dtype=dtype)
    mod = loras[victim][key]
    up, down = mod.factors(dtype)
    up = up.clone()
    up[3, 1] = value
    loras[victim].modules[key] = LoraModule.from_tensors(key, up, down, mod.scale)
    return loras


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e30, 1e20], ids=["inf", "nan", "1e30", "1e20"])
@pytest.mark.parametrize("method,kw", [
    ("do", {}), ("do", {"params": {"orth_optimizer": "adam"}}), ("ta", {}), ("ta", {"rank": 3}),
    ("ties", {}), ("do", {"compute_dtype": torch.float64, "value_ok": (1e30, 1e20)})],
    ids=["do", "do-adam", "ta", "ta-rank", "ties", "do-f64"])
def test_extreme_values_raise_a_domerge_error_naming_file_and_key(value, method, kw):
    """inf/NaN, or values whose Grams overflow float32 (they used to raise torch's _LinAlgError from
    eigh/svd, or to return non-finite factors silently): a NumericalError (a DomergeError) naming
    the input file and the module key. In float64 the huge-but-finite values merge fine."""
    from domerge_core.errors import DomergeError
    from domerge_core.errors import NumericalError
    kw = dict(kw)
    ok = kw.pop("value_ok", ())
    loras = _poisoned(value)
    if value in ok:
        res = merge(loras, method, device="cpu", **kw)
        assert all(torch.isfinite(t).all() for m in res.lora for t in m.factors(torch.float64))
        return
    with pytest.raises(NumericalError) as e:
        merge(loras, method, device="cpu", **kw)
    assert isinstance(e.value, DomergeError)
    msg = str(e.value)
    assert "in1.safetensors" in msg and LIN2 in msg and e.value.file == "in1.safetensors", msg
    # torch's own failure (e.g. eigh on an overflowed Gram) is chained, never raised bare
    assert e.value.__cause__ is None or isinstance(e.value.__cause__, torch.linalg.LinAlgError)


@pytest.mark.parametrize("value", [float("inf"), 1e20])
def test_analyze_raises_a_domerge_error_naming_file_and_key(value):
    from domerge_core import analyze
    from domerge_core.errors import NumericalError
    with pytest.raises(NumericalError) as e:
        analyze(_poisoned(value, key=LIN, victim=2), device="cpu")
    assert "in2.safetensors" in str(e.value) and LIN in str(e.value)


def test_extreme_values_in_a_module_only_one_lora_has_or_at_strength_zero():
    from domerge_core.errors import NumericalError
    loras = make(T=2, seed=5, keys=[set(SHAPES), {LIN}])
    up, down = loras[0][TE].factors()
    up = up.clone()
    up[0, 0] = float("inf")
    loras[0].modules[TE] = LoraModule.from_tensors(TE, up, down, 1.0)
    for w in ([1.0, 1.0], [0.0, 1.0]):         # TE only in input 0; then input 0 at strength 0
        with pytest.raises(NumericalError) as e:
            merge(loras, "do", weights=w, device="cpu")
        assert "in0.safetensors" in str(e.value) and TE in str(e.value)


def test_a_zero_module_is_not_a_numerical_error():
    """An all-zero up (an untrained module) is legal: merged, and the report stays finite."""
    loras = make(T=3, seed=6)
    up, down = loras[1][LIN].factors()
    loras[1].modules[LIN] = LoraModule.from_tensors(LIN, torch.zeros_like(up), down, 1.0)
    for method in ("do", "ta"):
        res = merge(loras, method, device="cpu")
        rep = json.loads(json.dumps(res.report, allow_nan=False))
        assert rep["modules"][LIN]["rel_delta_A"][1] == 0.0
        ref = merge([loras[0], loras[2]], method, device="cpu") if method == "ta" else None
        if ref is not None:
            assert rel(d64(res.lora[LIN]), d64(ref.lora[LIN])) < 1e-6


# ----------------------------------------------------------------------------- warm re-merge

def _snapshot(cache):
    out = []
    for value, _ in cache._stacked.values():
        for t in (value.B, value.A, value._alpha):
            if t is not None:
                out.append(t.clone())
    return out


@pytest.mark.parametrize("method,params", [("ta", {}), ("ta", {"lam": 0.6}), ("do", {}),
                                           ("do", {"recombine": "v2", "lam": 1.3}), ("ties", {"lam": 0.8}),
                                           ("ta", {"decouple": True, "lam": 0.5})])
def test_warm_remerge_reuses_stacked_batches_and_stays_bit_identical(method, params):
    """A warm strength change gets the stacked per-batch tensors back from the cache (no re-stacking),
    never modifies them in place (whichever factor carries the strengths, with λ ≠ 1), and gives
    exactly the cold result; a change of the active set (a strength to 0) misses and is exact too."""
    keys = [set(SHAPES), set(SHAPES), {LIN, CONV}]           # TE/LIN2 in two inputs, not in the third
    loras = make(corr=0.3, keys=keys)
    cache = MergeCache()
    merge(loras, method, params, weights=[1.0, 1.0, 1.0], device="cpu", cache=cache)
    snap = _snapshot(cache)
    assert cache.stacked_misses > 0 and cache.stacked_hits == 0
    for w in ([0.3, 2.0, -1.0], [1.2, 0.5, 0.7], [1.0, 0.0, 0.4], [0.9, 1.1, 0.0]):
        before = cache.stats()
        warm = merge(loras, method, params, weights=w, device="cpu", cache=cache)
        fresh = merge(loras, method, params, weights=w, device="cpu")
        for key in fresh.lora.modules:
            for x, y in zip(warm.lora[key].factors(), fresh.lora[key].factors()):
                assert torch.equal(x, y), (w, key)
        assert warm.report["modules"] == fresh.report["modules"]
        assert warm.report["diagnostics"] == fresh.report["diagnostics"]
        if w == [0.3, 2.0, -1.0] or w == [1.2, 0.5, 0.7]:
            after = cache.stats()
            assert after["stacked_hits"] > before["stacked_hits"]
            assert after["stacked_misses"] == before["stacked_misses"] and after["misses"] == before["misses"]
            cur = _snapshot(cache)
            assert len(cur) == len(snap) and all(torch.equal(a, b) for a, b in zip(cur, snap))
    # back to all active: everything is still cached
    before = cache.stats()
    merge(loras, method, params, weights=[0.7, 0.7, 0.7], device="cpu", cache=cache)
    assert cache.stats()["misses"] == before["misses"]


def test_cache_keeps_one_stacked_copy_per_module_and_bounds_it():
    loras = make(corr=0.3)
    cache = MergeCache()
    merge(loras, "do", device="cpu", cache=cache)
    n_stacked = cache.stats()["stacked"]
    assert n_stacked > 0
    # the module entries view the stacked tensors (no second copy)
    value, members = next(iter(cache._stacked.values()))
    e = cache._entries[members[0]]
    assert e.B.untyped_storage().data_ptr() == value.B.untyped_storage().data_ptr()
    for bound in (1, 2, 3):                     # LIN and LIN2 are one batch of 2
        small = MergeCache(max_entries=bound)
        res = merge(loras, "do", device="cpu", cache=small)
        assert len(small) == bound and sum(len(m) for _, m in small._stacked.values()) <= bound
        again = merge(loras, "do", device="cpu", cache=small)          # still exact
        for key in SHAPES:
            assert torch.equal(res.lora[key].factors()[1], again.lora[key].factors()[1])
    small.clear()
    assert small.stats() == {"entries": 0, "hits": 0, "misses": 0, "stacked": 0, "stacked_hits": 0,
                             "stacked_misses": 0}


def test_cli_merge_prints_rank_error_and_cosines(tmp_path):
    """The CLI's summary shows what the merge did: output rank, truncation error, cosines."""
    import subprocess
    import sys
    from domerge_core.formats import save_lora
    paths = [save_lora(l, str(tmp_path / f"in{i}.safetensors"), format="kohya")
             for i, l in enumerate(make(T=2, corr=0.5))]
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "domerge_core", "merge", *paths, "-o", str(out),
                        "--method", "do", "--rank", "2", "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "output rank       2" in r.stdout
    assert "truncation error  max" in r.stdout
    assert "after orthogonalization" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["diagnostics"]["mean_abs_cos_after"] < rep["diagnostics"]["mean_abs_cos_before"]


# ----------------------------------------------------------------------------- one-sided route

@pytest.mark.parametrize("method,params", [("do", {"recombine": "v1"}), ("do", {"recombine": "v2"}),
                                           ("do", {"lam": 0.7, "magnitude": "max", "recombine": "v1"}),
                                           ("do", {"lam": 1.2, "recombine": "v2"}),
                                           ("ta", {"orthogonalize": True, "lam": 1.3})])
def test_linear_merge_maps_the_smaller_side_only(method, params, monkeypatch):
    """For ``ta``/``do`` on a module with m > n, the orthogonalization's R×R transform, the strengths
    and the v1 recombination go to the down factor and the up factor is written as loaded (the
    inputs' up factors with their format scale): the update equals the two-sided route's."""
    from domerge_core.engine import combine as C

    loras = make(corr=0.3)                      # LIN, LIN2: m = 40 > n = 32
    w = [0.8, -0.5, 1.2]
    one = merge(loras, method, params, weights=w, device="cpu", compute_dtype=torch.float64)
    up = one.lora[LIN].factors(torch.float64)[0]
    loaded = torch.cat([l[LIN].scaled_factors(torch.float64)[0] for l in loras], 1)
    assert torch.equal(up, loaded)
    monkeypatch.setattr(C, "one_sided", lambda pre, W, ctx: None)
    two = merge(loras, method, params, weights=w, device="cpu", compute_dtype=torch.float64)
    for key in SHAPES:
        assert rel(d64(one.lora[key]), d64(two.lora[key])) < 1e-12, key


# ----------------------------------------------------------------------------- per-module strengths

@pytest.mark.parametrize("method", ["ta", "do", "ties"])
def test_multipliers_scale_an_inputs_strength_per_module(method):
    """``multipliers[i](key)`` multiplies input i's strength on that module (block weights, a CLIP
    strength): the same as merging with that strength, module by module; 0 leaves the input out."""
    loras = make(corr=0.2)
    mult = [None, lambda k: 0.5 if k.startswith("text_encoder") else 1.0,
            lambda k: 0.0 if k == LIN else 2.0]
    w = [1.0, 0.8, 0.6]
    res = merge(loras, method, weights=w, multipliers=mult, device="cpu", compute_dtype=torch.float64)
    for key in SHAPES:
        eff = [w[i] * (1.0 if f is None else f(key)) for i, f in enumerate(mult)]
        keep = [i for i, e in enumerate(eff) if e != 0.0]
        ref = merge([loras[i] for i in keep], method, weights=[eff[i] for i in keep], device="cpu",
                    compute_dtype=torch.float64)
        assert rel(d64(res.lora[key]), d64(ref.lora[key])) < 1e-9, key
    assert res.report["modules"][LIN]["inputs"] == [0, 1]


def test_multipliers_are_checked():
    loras = make()
    with pytest.raises(InvalidParameterError):
        merge(loras, "ta", multipliers=[None, None], device="cpu")
    with pytest.raises(InvalidParameterError):
        merge(loras, "ta", multipliers=[None, None, lambda k: float("nan")], device="cpu")


def test_a_linear_and_a_1x1_conv_are_the_same_weight():
    """One file stores a layer as a linear (m×n), another as a 1×1 conv (m×n×1×1): the shape rule
    treats them as the same weight, so they merge (as in `canonical`'s alignment)."""
    g = torch.Generator().manual_seed(4)
    key = "unet.down_blocks.1.attentions.0.proj_in"
    up1, down1 = torch.randn(40, 4, generator=g), torch.randn(4, 32, generator=g) / 6
    up2, down2 = torch.randn(40, 6, generator=g), torch.randn(6, 32, generator=g) / 6
    lin = Lora({key: LoraModule.from_tensors(key, up1, down1, 1.0)}, "kohya", source="lin.safetensors")
    conv = Lora({key: LoraModule.from_tensors(key, up2.reshape(40, 6, 1, 1), down2.reshape(6, 32, 1, 1), 0.5)},
                "kohya", source="conv.safetensors")
    from domerge_core import check_compatible
    check_compatible([lin, conv])
    res = merge([lin, conv], "ta", weights=[1.0, 0.7], device="cpu", compute_dtype=torch.float64)
    ref = up1.double() @ down1.double() + 0.7 * 0.5 * up2.double() @ down2.double()
    assert rel(d64(res.lora[key]), ref) < 1e-12


def test_cli_inspect_prints_the_pairwise_analysis(tmp_path):
    """``domerge inspect a b`` prints the analysis the core computed: both cosine matrices, the
    magnitude variance and one row per LoRA (one renderer, `domerge_core.report.text`)."""
    import subprocess
    import sys
    from domerge_core.formats import save_lora
    paths = [save_lora(l, str(tmp_path / f"in{i}.safetensors"), format="kohya")
             for i, l in enumerate(make(T=2, corr=0.5))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "domerge_core", "inspect", *paths], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "before orthogonalization" in r.stdout and "after orthogonalization" in r.stdout
    assert "magnitude variance" in r.stdout
    rows = [l for l in r.stdout.splitlines() if l.strip().startswith("in0.safetensors")
            or l.strip().startswith("in1.safetensors")]
    assert len(rows) >= 2, r.stdout


def test_no_method_means_the_registry_default():
    """``merge(method=None)`` (and the CLI, node and panel) start from the registry's default."""
    from domerge_core import default_method
    loras = make()
    a = merge(loras, None, device="cpu")
    b = merge(loras, default_method(), device="cpu")
    assert a.method == default_method()
    for key in SHAPES:
        assert torch.equal(a.lora[key].factors()[1], b.lora[key].factors()[1])


def test_output_rank_never_exceeds_what_the_layer_holds(tmp_path):
    """Σ ranks above min(m, n) (three rank-12 LoRAs on a 24×24 layer, or a full ``.diff``): the
    module is written exactly at rank min(m, n), and the file reads back (issue 15's finding)."""
    g = torch.Generator().manual_seed(2)
    mods = []
    for i in range(3):
        up, down = torch.randn(24, 12, generator=g), torch.randn(12, 24, generator=g) / 5
        mods.append(Lora({TE: LoraModule.from_tensors(TE, up, down, 1.0)}, "kohya", source=f"t{i}.safetensors"))
    for method in ("ta", "do"):
        res = merge(mods, method, device="cpu", compute_dtype=torch.float64)
        assert res.lora[TE].rank == 24 and res.report["modules"][TE]["rel_error"] < 1e-12
        if method == "ta":
            ref = sum(d64(l[TE]) for l in mods)
            assert rel(d64(res.lora[TE]), ref) < 1e-10
        back = __import__("domerge_core").load_lora(res.save(str(tmp_path / f"{method}.safetensors")))
        assert back[TE].rank == 24
