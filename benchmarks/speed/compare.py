"""Speed and memory of LoRA merging: our exact low-rank merge against what the usual tools do.

Side by side, same inputs, same output rank k:

- ``ta``      — ``domerge_core.merge(..., method="ta", rank=k)``: QR of the stacked factors plus an
               R×R core SVD per module (exact truncated SVD of Σ wᵢ sᵢ Bᵢ Aᵢ, never an m×n matrix);
- ``do``      — ``domerge_core.merge(..., method="do", rank=k)`` with its default options;
- ``svd``     — materialise ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ per module, ``torch.linalg.svd``, keep k (what kohya's
               ``networks/svd_merge_lora.py``, PEFT's ``*_svd`` combinations and ComfyUI's LoRA
               extraction do; in the baseline's favour we call the thin SVD, ``full_matrices=False``,
               on the tall orientation (LAPACK is ~3x slower on wide matrices), and skip the quantile
               clamp);
- ``lowrank`` — materialise, then ``torch.svd_lowrank(ΔW, q=k, niter=2)`` (randomised, approximate;
               the torch defaults several merge/extract nodes call; ``--lowrank-niter`` changes it).

Inputs are real-shape synthetic kohya LoRAs (module lists of SD1.5 / SDXL(+text encoders) / Flux.1
from ``benchmarks/synthetic.py``), fp16 factors held in memory like a loaded file. Every variant
runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own.

The materialising baselines are too slow to run over a whole model on one CPU thread (a whole SDXL
UNet takes ~10 min with the full SVD), so they run on a **stratified sample**: the modules are
grouped by shape and ``--per-shape`` modules of every shape are timed; the whole-model time is
extrapolated as Σ_shape count × mean time (every table row says whether it was measured or
extrapolated, and from how many modules). The same extrapolation is applied to ``ta`` and printed
next to its measured whole-model time, as a check of the method. On CPU the full SVD of shapes over
``--svd-max-mn`` elements (Flux) is predicted from a cost fit over the shapes timed in the same
process (``--svd-max-mn 0`` times them all: ~4 min more).

Time is the worker's CPU time on CPU (one thread: the wall time on an idle core, robust to other
users of a shared machine) and wall time between synchronisations on CUDA.

Accuracy: on one module per shape, the merged update's relative Frobenius error against a float64
reference (the exact rank-k truncation of the float64 Σ wᵢ sᵢ Bᵢ Aᵢ; for ``do``: ``merge`` itself in
float64). Errors are computed from the factors (‖X−Y‖² = ‖X‖² + ‖Y‖² − 2⟨X,Y⟩ in float64, r×r
Grams); one small module is cross-checked against the dense difference.

    python benchmarks/speed/compare.py --quick                 # < 2 min, CPU
    python benchmarks/speed/compare.py                         # full plan, ~10 min on 1 CPU thread
    python benchmarks/speed/compare.py --device cuda           # same comparison on a GPU
    python benchmarks/speed/compare.py --case sdxl+te:3:32 --variants ta,svd
    python benchmarks/speed/compare.py --plan methods            # every aligned method beside ta/do, whole model
    python benchmarks/speed/compare.py --plan methods --paired   # the same as ratios to ta, loaded machine

Writes JSON and a markdown report (``--json``, ``--md``; default under /tmp/domerge_speed/).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

WORKDIR = os.environ.get("DOMERGE_SPEED_DIR", "/tmp/domerge_speed")
VARIANTS = ("ta", "do", "svd", "lowrank")
BASELINES = ("svd", "lowrank")                          # materialising baselines; every other variant is a
#                                                        registered merge method run through merge()
ALIGNED = ("knots_ties", "knots_dare_ties", "knots_dare", "core_ties", "core_dare",
           "core_dare_ties", "tsv", "iso_c", "iso_cts", "cart")   # the aligned low-rank methods (issue 12)
WEIGHTS = (1.0, 0.7, 0.5, 0.8, 0.6, 0.9, 0.4, 0.75)   # user strengths, first T used
UP_SCALES = (0.01, 0.03, 0.003)                         # as benchmarks.synthetic.write_set

# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


def case(model: str, te: bool, T: int, rank: int, variants: Sequence[str], group: str,
         out_rank: Optional[int] = None) -> dict:
    return dict(model=model, te=te, T=T, rank=rank, out_rank=out_rank or rank,
                variants=list(variants), group=group)


def plan(name: str) -> List[dict]:
    allv = list(VARIANTS)
    if name == "quick":
        return [case("sd15", True, 3, 32, allv, "headline"),
                case("sdxl", True, 3, 32, allv, "headline")]
    if name == "gpu":
        return [c for c in plan("full") if c["group"] != "size"]
    if name == "methods":
        return [case("sdxl", True, 3, 32, ["ta", "do", *ALIGNED], "methods")]
    if name == "full":
        return [case("sd15", True, 3, 32, allv, "headline"),
                case("sdxl", True, 3, 32, allv, "headline"),
                case("flux", False, 3, 32, allv, "headline"),
                case("sdxl", True, 2, 32, allv, "T"),
                case("sdxl", True, 5, 32, allv, "T"),
                case("sdxl", True, 3, 16, allv, "rank"),
                case("sdxl", True, 3, 64, allv, "rank"),
                case("sd15", False, 3, 32, ["ta", "do"], "size"),
                case("sdxl", False, 3, 32, ["ta", "do"], "size")]
    raise SystemExit(f"unknown plan {name!r}")


def parse_case(spec: str, variants: Sequence[str]) -> dict:
    """``model[+te]:T:rank[:out_rank]``, e.g. ``sdxl+te:3:32``."""
    parts = spec.split(":")
    model = parts[0]
    te = model.endswith("+te")
    model = model[:-3] if te else model
    T = int(parts[1]) if len(parts) > 1 else 3
    r = int(parts[2]) if len(parts) > 2 else 32
    k = int(parts[3]) if len(parts) > 3 else r
    return case(model, te, T, r, variants, "custom", k)


def case_label(c: dict) -> str:
    return f"{c['model']}{'+te' if c['te'] else ''} T={c['T']} r{c['rank']}→{c['out_rank']}"


# ----------------------------------------------------------------------------------------------
# Inputs: module lists (cached as JSON) and per-module deterministic synthetic factors
# ----------------------------------------------------------------------------------------------


def module_list_cached(model: str, te: bool) -> "OrderedDict[str, Tuple[int, ...]]":
    """kohya name -> weight shape; diffusers' meta-device models are built once, then cached."""
    os.makedirs(WORKDIR, exist_ok=True)
    path = os.path.join(WORKDIR, f"modules_{model}{'_te' if te else ''}.json")
    if os.path.exists(path):
        with open(path) as f:
            return OrderedDict((k, tuple(v)) for k, v in json.load(f))
    from benchmarks.synthetic import module_list

    mods = module_list(model, te=te)
    with open(path + ".part", "w") as f:
        json.dump([[k, list(v)] for k, v in mods.items()], f)
    os.replace(path + ".part", path)
    return mods


def strata(mods: "OrderedDict[str, Tuple[int, ...]]") -> "OrderedDict[Tuple[int, ...], List[str]]":
    """Modules grouped by weight shape, in first-seen order."""
    out: "OrderedDict[Tuple[int, ...], List[str]]" = OrderedDict()
    for k, s in mods.items():
        out.setdefault(tuple(s), []).append(k)
    return out


def sample_strata(mods, per_shape: int) -> "OrderedDict[Tuple[int, ...], List[str]]":
    """``per_shape`` evenly spaced modules of every shape (deterministic)."""
    out = OrderedDict()
    for shape, names in strata(mods).items():
        n = min(per_shape, len(names))
        idx = sorted({round(j * (len(names) - 1) / max(n - 1, 1)) for j in range(n)}) if n > 1 else [0]
        out[shape] = [names[i] for i in idx]
    return out


def make_inputs(mods: Dict[str, Tuple[int, ...]], T: int, rank: int, names: Optional[Sequence[str]] = None):
    """T in-memory `Lora`s (fp16 factors, kohya scale alpha/rank = 1) over ``names`` (default: all).

    Every module's factors are seeded by (LoRA index, module index), so a subset is the same tensors
    as in the whole set — the sampled baselines see exactly the inputs the whole-model run sees."""
    from benchmarks.synthetic import synthetic_kohya
    from domerge_core.lora import Lora, LoraModule

    order = {k: i for i, k in enumerate(mods)}
    names = list(mods) if names is None else list(names)
    loras = []
    for i in range(T):
        out = OrderedDict()
        for name in names:
            sd, _ = synthetic_kohya(rank=rank, up_scale=UP_SCALES[i % len(UP_SCALES)],
                                    seed=1_000_003 * (i + 1) + order[name], dtype=torch.float16,
                                    modules={name: mods[name]})
            up, down = sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"]
            alpha = float(sd[name + ".alpha"])
            out[name] = LoraModule.from_tensors(name, up, down, scale=alpha / down.shape[0])
        loras.append(Lora(modules=out, format="kohya", source=f"<synthetic {i}>", dtype=torch.float16))
    return loras


def sub_loras(loras, names: Sequence[str]):
    from dataclasses import replace

    return [replace(l, modules=OrderedDict((n, l.modules[n]) for n in names)) for l in loras]


# ----------------------------------------------------------------------------------------------
# The reference implementations written here (what the usual tools do)
# ----------------------------------------------------------------------------------------------


def materialise(mods_i, weights, device, dtype=torch.float32) -> torch.Tensor:
    """Dense ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ (m×n; conv flattened)."""
    dW = None
    for w, m in zip(weights, mods_i):
        up, down = m.scaled_factors(dtype, device)
        if dW is None:
            dW = torch.zeros(up.shape[0], down.shape[1], dtype=dtype, device=device)
        dW.addmm_(up, down, alpha=w)
    return dW


def svd_merge_module(mods_i, weights, k, device, algo: str, niter: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Materialise + (full | randomised) SVD + truncate to k; returns (up m×k, down k×n) on CPU."""
    dW = materialise(mods_i, weights, device)
    if algo == "svd":
        # LAPACK's SVD is ~3x slower on a wide matrix than on its transpose (torch 2.13, CPU); the
        # tools call it as is, we give the baseline the faster orientation.
        if dW.shape[0] < dW.shape[1]:
            V, S, Uh = torch.linalg.svd(dW.T, full_matrices=False)
            U, Vh = Uh.T, V.T
        else:
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    else:
        U, S, V = torch.svd_lowrank(dW, q=k, niter=niter)
        Vh = V.T
    del dW
    rs = S.sqrt()
    return (U * rs).cpu(), (rs[:, None] * Vh).cpu()


def reference_fp64(mods_i, weights, k) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-k truncation of the float64 ΣwᵢsᵢBᵢAᵢ, from the factors (QR + core SVD in float64)."""
    B = torch.cat([w * m.scaled_factors(torch.float64)[0] for w, m in zip(weights, mods_i)], 1)
    A = torch.cat([m.factors(torch.float64)[1] for m in mods_i], 0)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T)
    rs = S[:k].sqrt()
    return (Qb @ Uc[:, :k]) * rs, rs[:, None] * (Vhc[:k] @ Qa.T)


def rel_err_factors(up, down, ref_up, ref_down) -> float:
    """‖XY − X'Y'‖_F / ‖X'Y'‖_F from the factors, in float64."""
    up, down, ref_up, ref_down = (t.double().cpu() for t in (up, down, ref_up, ref_down))

    def inner(b1, a1, b2, a2):
        return float(((b1.T @ b2) * (a1 @ a2.T)).sum())

    xx, yy, xy = inner(up, down, up, down), inner(ref_up, ref_down, ref_up, ref_down), inner(up, down, ref_up, ref_down)
    return math.sqrt(max(xx + yy - 2 * xy, 0.0) / yy) if yy > 0 else 0.0


def rel_err_dense(up, down, ref_up, ref_down) -> float:
    X = up.double() @ down.double()
    Y = ref_up.double() @ ref_down.double()
    return float(torch.linalg.norm(X - Y) / torch.linalg.norm(Y))


# ----------------------------------------------------------------------------------------------
# Worker: one (case, variant) in its own process
# ----------------------------------------------------------------------------------------------


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device, variant: str) -> None:
    """First-call costs (LAPACK/cuSOLVER handles, lazy imports) are kept out of the timings."""
    x = torch.randn(64, 48, device=device)
    torch.linalg.qr(x)
    torch.linalg.svd(x, full_matrices=False)
    torch.svd_lowrank(x, q=4, niter=2)
    if variant not in BASELINES:
        from domerge_core import merge
        from domerge_core.lora import Lora, LoraModule

        tiny = [Lora(modules={"a": LoraModule.from_tensors("a", torch.randn(8, 2), torch.randn(2, 6))},
                     format="kohya") for _ in range(2)]
        merge(tiny, variant, rank=2, device=str(device))
    sync(device)


def run_merge(loras, variant, weights, k, device, compute_dtype=torch.float32):
    from domerge_core import merge

    return merge(loras, variant, weights=list(weights), rank=k, device=str(device), compute_dtype=compute_dtype)


class Clock:
    """CPU: this process's CPU time — with one thread that is the wall time the run would take on
    an idle core, and it does not count the time other users of a shared machine hold the cores.
    CUDA: wall time between synchronisations."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        sync(self.device)
        return time.process_time() if self.device.type == "cpu" else time.perf_counter()


def fit_svd_cost(points: Sequence[Tuple[int, int, float]]):
    """Least-squares fit ``t ≈ a·p·q² + b·q³`` (q = min(m,n), p = max(m,n); a, b ≥ 0) to per-module
    times, relative residuals. Returns a predictor (m, n) -> seconds and the coefficients."""
    def basis(m, n):
        p, q = max(m, n), min(m, n)
        return [p * q * q, float(q) ** 3]

    X = torch.tensor([basis(m, n) for m, n, _ in points], dtype=torch.float64)
    y = torch.tensor([t for _, _, t in points], dtype=torch.float64)
    Xw, yw = X / y[:, None], torch.ones_like(y)
    best = None
    for cols in ([0, 1], [0], [1]):
        coef = torch.linalg.lstsq(Xw[:, cols], yw[:, None]).solution[:, 0]
        if (coef < 0).any():
            continue
        full = torch.zeros(2, dtype=torch.float64)
        full[cols] = coef
        resid = float(((Xw @ full - yw) ** 2).sum())
        if best is None or resid < best[1] - 1e-12:
            best = (full, resid)
    coef = best[0] if best is not None else torch.tensor([float(y.mean() / X[:, 0].mean()), 0.0], dtype=torch.float64)
    return (lambda m, n: float(torch.tensor(basis(m, n), dtype=torch.float64) @ coef)), [float(c) for c in coef]


def worker(cfg: dict) -> dict:
    torch.set_num_threads(cfg.get("threads", 1))
    device = torch.device(cfg["device"])
    clock = Clock(device)
    variant, T, r, k = cfg["variant"], cfg["T"], cfg["rank"], cfg["out_rank"]
    weights = WEIGHTS[:T]
    mods = module_list_cached(cfg["model"], cfg["te"])
    groups = strata(mods)
    sample = sample_strata(mods, cfg["per_shape"])
    res: dict = dict(variant=variant, modules=len(mods), shapes=len(groups), device=str(device),
                     clock="cpu time" if device.type == "cpu" else "wall", loadavg_start=os.getloadavg()[0])
    whole = variant not in BASELINES
    timed_shapes = list(sample)
    cap = cfg.get("svd_max_mn") if variant == "svd" else None
    if cap:
        # the full SVD of the largest shapes takes minutes each on one CPU thread: time every shape
        # up to ``cap`` elements (and at least the two smallest), predict the rest from a cost fit
        by_size = sorted(sample, key=lambda s: s[0] * s[1])
        timed_shapes = [s for s in by_size if s[0] * s[1] <= cap]
        for s in by_size:
            if len(timed_shapes) >= 2:
                break
            if s not in timed_shapes:
                timed_shapes.append(s)
        timed_shapes = [s for s in sample if s in timed_shapes]
    err_names = [sample[s][0] for s in timed_shapes]
    names = list(mods) if whole else [n for s in timed_shapes for n in sample[s]]

    t0 = time.perf_counter()
    loras = make_inputs(mods, T, r, names)
    res["gen_s"] = time.perf_counter() - t0
    res["input_mb"] = sum(m.rank * (m.out_features + m.in_features) * 2 for l in loras for m in l) / 2**20
    warm_up(device, variant)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = rss_now_mb()
    res["rss_inputs_mb"] = rss0

    outputs: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    if whole:
        prof = None
        if cfg.get("profile"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        w0, t0 = time.perf_counter(), clock()
        result = run_merge(loras, variant, weights, k, device)
        res["time_s"] = clock() - t0
        res["wall_timed_s"] = time.perf_counter() - w0
        if prof is not None:
            prof.disable()
            import io
            import pstats

            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(cfg.get("profile_sort", "tottime")).print_stats(25)
            res["profile"] = s.getvalue()
        res["measured_modules"] = len(mods)
        res["extrapolated"] = False
        res["rss_peak_mb"] = rss_peak_mb()
        if device.type == "cuda":
            res["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        missing = [n for n in err_names if n not in result.lora.modules]
        if missing:
            raise RuntimeError(f"merge result lacks modules {missing[:3]} (keys look like "
                               f"{list(result.lora.modules)[:2]})")
        for n in err_names:
            outputs[n] = result.lora.modules[n].scaled_factors(torch.float64)
        res["out_rank_seen"] = max(m.rank for m in result.lora)
        res["output_mb"] = sum(t.nelement() * t.element_size() for m in result.lora for t in m.loader()) / 2**20
        del result
        gc.collect()
        if variant == "ta" and not cfg.get("no_extrapolation_check"):
            # the same stratified extrapolation the baselines get, as a check of the method
            est = 0.0
            for shape, ns in sample.items():
                sub = sub_loras(loras, ns)
                t0 = clock()
                run_merge(sub, variant, weights, k, device)
                est += (clock() - t0) / len(ns) * len(groups[shape])
            res["extrapolated_check_s"] = est
    else:
        niter = cfg.get("lowrank_niter", 2)
        per_shape = []
        out_bytes = 0
        w0 = time.perf_counter()
        for shape in timed_shapes:
            ns = sample[shape]
            t0 = clock()
            for n in ns:
                up, down = svd_merge_module([l.modules[n] for l in loras], weights, k, device, variant, niter)
                out_bytes += up.nelement() * up.element_size() + down.nelement() * down.element_size()
                if n in err_names:
                    outputs[n] = (up, down)
            dt = clock() - t0
            per_shape.append(dict(shape=list(shape), count=len(groups[shape]), timed=len(ns), s=dt / len(ns),
                                  predicted=False))
        res["wall_timed_s"] = time.perf_counter() - w0
        predicted = [s for s in sample if s not in timed_shapes]
        if predicted:
            fit, coef = fit_svd_cost([(p["shape"][0], math.prod(p["shape"][1:]), p["s"]) for p in per_shape])
            res["cost_fit"] = dict(formula="t = a*max(m,n)*min(m,n)^2 + b*min(m,n)^3", a=coef[0], b=coef[1])
            for shape in predicted:
                per_shape.append(dict(shape=list(shape), count=len(groups[shape]), timed=0,
                                      s=fit(shape[0], math.prod(shape[1:])), predicted=True))
        res["time_s"] = sum(p["s"] * p["count"] for p in per_shape)
        res["output_mb"] = out_bytes / 2**20
        res["measured_modules"] = len(names)
        res["predicted_shapes"] = len(predicted)
        res["extrapolated"] = True
        res["per_shape"] = per_shape
        res["rss_peak_mb"] = rss_peak_mb()
        if device.type == "cuda":
            res["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    res["rss_extra_mb"] = max(res["rss_peak_mb"] - rss0, 0.0)
    res["working_mb"] = max(res["rss_extra_mb"] - res["output_mb"], 0.0)
    res["full_output_mb"] = sum((s[0] + math.prod(s[1:])) * k * 4 for s in mods.values()) / 2**20

    # accuracy against float64, one module per shape (after the RSS reading)
    errs = {}
    if variant not in ("ta",) + BASELINES:
        ref = run_merge(sub_loras(loras, err_names), variant, weights, k, torch.device("cpu"), torch.float64)
        refs = {n: ref.lora.modules[n].scaled_factors(torch.float64) for n in err_names}
    else:
        refs = {n: reference_fp64([l.modules[n] for l in loras], weights, k) for n in err_names}
    for n in err_names:
        errs[n] = rel_err_factors(*outputs[n], *refs[n])
    small = min(err_names, key=lambda n: mods[n][0] * mods[n][1])
    res["dense_check"] = abs(rel_err_dense(*outputs[small], *refs[small]) - errs[small])
    res["err_max"] = max(errs.values())
    res["err_median"] = sorted(errs.values())[len(errs) // 2]
    # truncation error of the exact rank-k merge (identical for every exact method)
    if variant in ("ta",) + BASELINES:
        tr, full = [], []
        for n in err_names:
            mi = [l.modules[n] for l in loras]
            B = torch.cat([w * m.scaled_factors(torch.float64)[0] for w, m in zip(weights, mi)], 1)
            A = torch.cat([m.factors(torch.float64)[1] for m in mi], 0)
            S = torch.linalg.svdvals(torch.linalg.qr(B)[1] @ torch.linalg.qr(A.T)[1].T)
            tr.append(float((S[k:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt()))
            # this variant's error against the untruncated update (the optimum is the truncation above)
            full.append(rel_err_factors(*outputs[n], B, A) / max(tr[-1], 1e-300))
        res["trunc_err_median"] = sorted(tr)[len(tr) // 2]
        res["excess_over_optimum_max"] = max(full)
    res["loadavg_end"] = os.getloadavg()[0]
    return res


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def paired_worker(cfg: dict) -> dict:
    """Each variant against ``ta`` in one process, timed alternately (ta, variant, ta, variant, …) on the
    same stratified sample, min of ``rounds`` per shape, extrapolated to the whole model as
    Σ_shape count × time per module. On a shared, loaded machine the absolute times drift with the
    load; the alternation keeps the ratio honest."""
    torch.set_num_threads(cfg.get("threads", 1))
    device = torch.device(cfg["device"])
    clock = Clock(device)
    T, r, k = cfg["T"], cfg["rank"], cfg["out_rank"]
    weights = WEIGHTS[:T]
    mods = module_list_cached(cfg["model"], cfg["te"])
    groups = strata(mods)
    sample = sample_strata(mods, cfg["per_shape"])
    names = [n for ns in sample.values() for n in ns]
    loras = make_inputs(mods, T, r, names)
    subs = {shape: sub_loras(loras, ns) for shape, ns in sample.items()}
    variants = [v for v in cfg["variants"] if v != "ta"]
    for v in ["ta"] + variants:
        warm_up(device, v)
        for sub in subs.values():
            run_merge(sub, v, weights, k, device)          # first-call costs per shape
    best = {v: {shape: float("inf") for shape in sample} for v in ["ta"] + variants}
    for _ in range(cfg.get("rounds", 3)):
        for v in variants:
            for name in ("ta", v):
                for shape, sub in subs.items():
                    t0 = clock()
                    run_merge(sub, name, weights, k, device)
                    best[name][shape] = min(best[name][shape], (clock() - t0) / len(sample[shape]))
    est = {v: sum(best[v][s] * len(groups[s]) for s in sample) for v in best}
    return dict(variant="paired", modules=len(mods), shapes=len(groups), sampled=len(names),
                rounds=cfg.get("rounds", 3), est_s=est, ratio={v: est[v] / est["ta"] for v in est},
                loadavg_start=os.getloadavg()[0])


def run_worker(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.get("threads", 1)), MKL_NUM_THREADS=str(cfg.get("threads", 1)),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(variant=cfg["variant"], error=f"timed out after {timeout:.0f} s")
    wall = time.perf_counter() - t0
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["wall_s"] = wall
            return out
    tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
    return dict(variant=cfg["variant"], error=" | ".join(tail) or f"exit {p.returncode}")


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def fmt_err(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.1e}"


def size_stats(model: str, te: bool) -> dict:
    mods = module_list_cached(model, te)
    return dict(modules=len(mods), sum_mn=sum(s[0] * s[1] for s in mods.values()),
                sum_m_plus_n=sum(s[0] + s[1] for s in mods.values()))


def headline_table(rows: List[dict]) -> List[str]:
    out = ["| inputs | modules | variant | time (s) | × ta's time | peak RSS (MB) | working memory (MB) | "
           "rel. err vs fp64 (max) | ‖ΔW−X‖ / optimum (max) | how measured |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        ta = next((v for v in c["results"] if v.get("variant") == "ta" and "time_s" in v), None)
        for v in c["results"]:
            if "error" in v:
                out.append(f"| {case_label(c)} | | {v['variant']} | FAILED: {v['error'][:120]} | | | | | | |")
                continue
            ratio = v["time_s"] / ta["time_s"] if ta else None
            gpu = f" (GPU {v['gpu_peak_mb']:.0f})" if "gpu_peak_mb" in v else ""
            if v["extrapolated"]:
                how = f"extrapolated from {v['measured_modules']} modules ({v['shapes']} shapes)"
                if v.get("predicted_shapes"):
                    how += f"; {v['predicted_shapes']} largest shapes predicted by a cost fit (see the notes)"
            else:
                how = "measured, whole model"
                if "extrapolated_check_s" in v:
                    how += f"; extrapolation check {fmt_s(v['extrapolated_check_s'])} s"
            out.append(f"| {case_label(c)} | {v['modules']} | {v['variant']} | {fmt_s(v['time_s'])} | "
                       f"{'' if ratio is None else f'{ratio:.1f}×'} | {v['rss_peak_mb']:.0f}{gpu} | "
                       f"{v['working_mb']:.0f} | {fmt_err(v.get('err_max'))} | "
                       f"{'—' if v.get('excess_over_optimum_max') is None else format(v['excess_over_optimum_max'], '.4f')} | {how} |")
    return out


def scaling_section(cases: List[dict]) -> List[str]:
    def t(c, var):
        v = next((v for v in c["results"] if v.get("variant") == var and "time_s" in v), None)
        return v["time_s"] if v else None

    out: List[str] = []
    lines = []
    variants = [v for v in VARIANTS if any(r.get("variant") == v for c in cases for r in c["results"])]
    for axis, key, filt in (("T (number of LoRAs)", "T", lambda c: c["model"] == "sdxl" and c["te"] and c["rank"] == 32),
                            ("rank r (= output rank)", "rank", lambda c: c["model"] == "sdxl" and c["te"] and c["T"] == 3)):
        sel = sorted({c[key]: c for c in cases if filt(c)}.values(), key=lambda c: c[key])
        if len(sel) < 2:
            continue
        out.append(f"\nTime (s) vs {axis}, SDXL+TE:\n")
        out.append("| " + key + " | " + " | ".join(variants) + " |")
        out.append("|---" * (len(variants) + 1) + "|")
        for c in sel:
            out.append(f"| {c[key]} | " + " | ".join(fmt_s(t(c, v)) for v in variants) + " |")
        exps = {v: fit_exponent([c[key] for c in sel], [t(c, v) for c in sel]) for v in variants}
        lines.append((axis, exps))
    # model size: x = Σ m·n of the targeted base weights (dense size) and Σ(m+n) (LoRA size per rank)
    sel = [c for c in cases if c["T"] == 3 and c["rank"] == 32]
    sel = sorted({(c["model"], c["te"]): c for c in sel}.values(), key=lambda c: c["size"]["sum_mn"])
    if len(sel) >= 2:
        out.append("\nTime (s) vs model size (T=3, r32→32):\n")
        out.append("| inputs | modules | Σ m·n (dense params) | Σ (m+n)·r (LoRA params) | " + " | ".join(variants) + " |")
        out.append("|---" * (len(variants) + 4) + "|")
        for c in sel:
            s = c["size"]
            out.append(f"| {case_label(c)} | {s['modules']} | {s['sum_mn'] / 1e9:.2f} G | "
                       f"{s['sum_m_plus_n'] * c['rank'] / 1e6:.0f} M | " + " | ".join(fmt_s(t(c, v)) for v in variants) + " |")
        lines.append(("LoRA size Σ(m+n)·r", {v: fit_exponent([c["size"]["sum_m_plus_n"] for c in sel],
                                                              [t(c, v) for c in sel]) for v in variants}))
        lines.append(("dense size Σ m·n", {v: fit_exponent([c["size"]["sum_mn"] for c in sel],
                                                            [t(c, v) for c in sel]) for v in variants}))
    if lines:
        out.append("\nMeasured exponents (least-squares slope of log time vs log x; time ∝ x^α):\n")
        out.append("| x | " + " | ".join(variants) + " |")
        out.append("|---" * (len(variants) + 1) + "|")
        for axis, exps in lines:
            out.append(f"| {axis} | " + " | ".join("—" if exps[v] is None else f"{exps[v]:.2f}" for v in variants) + " |")
    return out


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _first(c: dict, key: str, whole: bool = False) -> str:
    for v in c["results"]:
        if key in v and (not whole or not v.get("extrapolated")):
            return f"{v[key]:.0f}"
    return "?"


def report(cases: List[dict], meta: dict) -> str:
    lines = [f"## Speed and memory — {meta['date']}", "",
             f"Command: `{meta['command']}`  ",
             f"Device: **{meta['device']}**{' (' + meta['machine'].get('gpu', '') + ')' if meta['machine'].get('gpu') else ''}; "
             f"CPU {meta['machine']['cpu']}, {meta['machine']['cores']} cores, torch {meta['machine']['torch']}, "
             f"{meta['threads']} thread(s) per process; every variant in its own process.  ",
             f"Machine load (1-min load average) at start {meta['load_start']:.2f}, end {meta['load_end']:.2f}, "
             f"max seen by a worker {meta['load_max']:.2f} (shared machine: absolute times are noisy, ratios less so).  ",
             f"Times are {'CPU seconds of the worker process (1 thread: the wall time on an idle core)' if meta['device'] == 'cpu' else 'wall seconds between CUDA synchronisations'}; "
             f"inputs are generated before the clock starts and the first-call costs are warmed up.  ",
             f"Baselines timed on {meta['per_shape']} module(s) per distinct shape and extrapolated "
             f"(Σ count × mean time per shape); `ta`/`do` measured over the whole model"
             + (f"; full-SVD shapes over {meta['svd_max_mn']:.0e} elements are predicted from a cost fit "
                f"t = a·max(m,n)·min(m,n)² + b·min(m,n)³ over the shapes timed in the same process" if meta.get('svd_max_mn') else "")
             + ".  ",
             f"Total wall time of this run: {meta['wall_s']:.0f} s.", ""]
    head = [c for c in cases if c["group"] in ("headline", "custom")]
    lines += ["### Side by side (same inputs, same output rank)", ""] + headline_table(head)
    lines += ["", "Memory: *peak RSS* is the worker's `ru_maxrss` (Python + torch ≈ 240 MB, plus the inputs it holds: "
              "the whole model for `ta`/`do`, only the sampled modules for the baselines). *Working memory* = peak RSS − "
              "RSS once the inputs are loaded − the merged output held at the end: the transient memory the algorithm "
              "needs, comparable between whole and sampled runs (a whole run of any variant peaks at about "
              "240 MB + inputs + merged output + working memory). Inputs (fp16 factors) and merged output (fp32, rank k): "
              + "; ".join(f"{case_label(c)}: {_first(c, 'input_mb', whole=True)} MB in, {_first(c, 'full_output_mb')} MB out"
                          for c in head) + "."]
    lines += ["", "Errors: relative Frobenius error of the merged update against the exact rank-k truncation of the "
              "float64 Σ wᵢ sᵢ Bᵢ Aᵢ (one module per shape); for `do`, against `merge(..., compute_dtype=float64)`. "
              "*‖ΔW−X‖ / optimum*: the result's distance to the untruncated ΔW divided by the smallest distance any "
              "rank-k X can have (Eckart–Young; 1.0000 = optimal, not defined for `do`, whose target is another update). "
              "The truncation itself (what any rank-k result must lose) is, median over the sampled modules: "
              + "; ".join(f"{case_label(c)}: {fmt_err(next((v.get('trunc_err_median') for v in c['results'] if v.get('trunc_err_median') is not None), None))}"
                          for c in head) + "."]
    lines += scaling_section(cases)
    return "\n".join(lines) + "\n"


def plot_scaling(cases: List[dict], path: str, title: str = "") -> None:
    """Log-log time vs T, vs rank and vs model size, one line per variant, exponents in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def t(c, var):
        v = next((v for v in c["results"] if v.get("variant") == var and "time_s" in v), None)
        return v["time_s"] if v else None

    axes_spec = [
        ("number of LoRAs T (SDXL+TE, r32→32)", lambda c: c["T"],
         lambda c: c["model"] == "sdxl" and c["te"] and c["rank"] == 32),
        ("rank r = output rank (SDXL+TE, T=3)", lambda c: c["rank"],
         lambda c: c["model"] == "sdxl" and c["te"] and c["T"] == 3),
        ("dense size Σ m·n of the patched weights (T=3, r32)", lambda c: c["size"]["sum_mn"],
         lambda c: c["T"] == 3 and c["rank"] == 32),
    ]
    style = {"ta": ("C0", "o-"), "do": ("C1", "s-"), "svd": ("C3", "^--"), "lowrank": ("C2", "v--")}
    fig, axs = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (label, xf, filt) in zip(axs, axes_spec):
        sel = sorted({xf(c): c for c in cases if filt(c)}.values(), key=xf)
        for var in VARIANTS:
            pts = [(xf(c), t(c, var)) for c in sel if t(c, var)]
            if len(pts) < 2:
                continue
            e = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
            color, ls = style[var]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, label=f"{var} (∝ x^{e:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if sel and label.startswith(("number", "rank")):
            ax.set_xticks([xf(c) for c in sel])
            ax.set_xticklabels([str(xf(c)) for c in sel])
            ax.minorticks_off()
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axs[0].set_ylabel("time (s; svd/lowrank extrapolated)")
    fig.suptitle(title or "LoRA merge time: exact low-rank (ta, do) vs materialise + SVD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the whole comparison runs there)")
    ap.add_argument("--quick", action="store_true", help="SD1.5+TE and SDXL+TE at T=3 r32, ta-only scaling (< 2 min)")
    ap.add_argument("--plan", choices=["quick", "full", "gpu", "methods"],
                    help="default: full (quick with --quick); methods: every aligned method beside ta and do on "
                         "SDXL+TE, T=3, rank 32")
    ap.add_argument("--case", action="append", default=[], help="model[+te]:T:rank[:out_rank] (replaces the plan)")
    ap.add_argument("--variants", help=f"comma list: {','.join(VARIANTS)} or any registered method "
                                       f"(default: the plan's; {','.join(VARIANTS)} for --case)")
    ap.add_argument("--per-shape", type=int, help="baseline modules timed per distinct shape (default 1; gpu plan 3)")
    ap.add_argument("--lowrank-niter", type=int, default=2)
    ap.add_argument("--svd-max-mn", type=float,
                    help="full SVD: time shapes up to this many elements (at least the two smallest), predict larger "
                         "ones from a cost fit (default 2e7 on CPU, no limit on CUDA; 0 = no limit)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paired", action="store_true",
                    help="time every variant of the plan against ta alternately in one process on a stratified "
                         "sample (--per-shape modules of every shape, default 3; min of 3 rounds) and report "
                         "whole-model estimates and ratios — for a loaded machine")
    ap.add_argument("--timeout", type=float, default=900, help="per worker process, seconds")
    ap.add_argument("--profile", action="store_true", help="cProfile the ta/do merges (printed)")
    ap.add_argument("--json", default=os.path.join(WORKDIR, "results.json"))
    ap.add_argument("--md", default=os.path.join(WORKDIR, "results.md"))
    ap.add_argument("--plot", help="also write the scaling plot (PNG) here")
    ap.add_argument("--from-json", help="no run: rebuild the report (and --plot) from an earlier --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.from_json:
        with open(a.from_json) as f:
            data = json.load(f)
        md = report(data["cases"], data["meta"])
        if a.plot:
            plot_scaling(data["cases"], a.plot, f"{data['meta']['device']} · {data['meta']['date']}")
        print(md)
        return

    if a.worker:
        try:
            wcfg = json.loads(a.worker)
            res = paired_worker(wcfg) if wcfg.get("paired") else worker(wcfg)
        except Exception as e:  # reported in the table, the run goes on
            import traceback

            traceback.print_exc()
            res = dict(variant=json.loads(a.worker)["variant"], error=f"{type(e).__name__}: {e}")
        print("RESULT " + json.dumps(res), flush=True)
        return

    torch.set_num_threads(a.threads)
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    plan_name = a.plan or ("quick" if a.quick else ("gpu" if device.startswith("cuda") else "full"))
    variants = [v for v in a.variants.split(",") if v] if a.variants else None
    cases = [parse_case(s, variants or list(VARIANTS)) for s in a.case] if a.case else plan(plan_name)
    if variants:
        for c in cases:
            c["variants"] = [v for v in c["variants"] if v in variants]
    per_shape = a.per_shape or (3 if plan_name == "gpu" else 1)
    svd_max_mn = a.svd_max_mn if a.svd_max_mn is not None else (0 if device.startswith("cuda") else 2e7)

    if a.paired:
        lines = ["| inputs | method | est. whole-model time (s) | × ta |", "|---|---|---|---|"]
        for c in cases:
            cfg = dict(model=c["model"], te=c["te"], T=c["T"], rank=c["rank"], out_rank=c["out_rank"],
                       variants=c["variants"], device=device, per_shape=a.per_shape or 3, threads=a.threads,
                       paired=True, variant="paired")
            res = run_worker(cfg, a.timeout * max(1, len(c["variants"])))
            if "error" in res:
                raise SystemExit(f"{case_label(c)}: {res['error']}")
            for v in ["ta"] + [v for v in c["variants"] if v != "ta"]:
                lines.append(f"| {case_label(c)} | {v} | {fmt_s(res['est_s'][v])} | {res['ratio'][v]:.2f}× |")
            lines.append(f"\n{res['sampled']} of {res['modules']} modules ({res['shapes']} shapes) timed, min of "
                         f"{res['rounds']} alternating rounds, load {res['loadavg_start']:.1f} at the start; "
                         f"{'CPU time, ' + str(a.threads) + ' thread(s)' if device == 'cpu' else 'wall time'}.")
            c["paired"] = res
        md = "\n".join(lines)
        for path, text in ((a.json, json.dumps(dict(cases=cases), indent=1)), (a.md, md)):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
        print(md)
        return

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    for c in cases:
        c["size"] = size_stats(c["model"], c["te"])
    for c in cases:
        c["results"] = []
        for v in c["variants"]:
            cfg = dict(model=c["model"], te=c["te"], T=c["T"], rank=c["rank"], out_rank=c["out_rank"],
                       variant=v, device=device, per_shape=per_shape, threads=a.threads,
                       lowrank_niter=a.lowrank_niter, profile=a.profile, svd_max_mn=svd_max_mn,
                       no_extrapolation_check=plan_name == "quick" or c["group"] not in ("headline", "custom"))
            res = run_worker(cfg, a.timeout)
            c["results"].append(res)
            if "error" in res:
                print(f"{case_label(c):28s} {v:8s} FAILED: {res['error']}", flush=True)
                continue
            print(f"{case_label(c):28s} {v:15s} {res['time_s']:9.3f} s{' (extrap.)' if res['extrapolated'] else '          '}"
                  f"  peak RSS {res['rss_peak_mb']:7.0f} MB (+{res['rss_extra_mb']:.0f})"
                  f"  err {res['err_max']:.1e}  [wall {res['wall_s']:.0f} s, load {res['loadavg_start']:.2f}]",
                  flush=True)
            if res.get("profile"):
                print(res["profile"])
    meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                command="python benchmarks/speed/compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
                device=device, machine=machine_info(device), threads=a.threads, per_shape=per_shape,
                svd_max_mn=svd_max_mn,
                load_start=load_start, load_end=os.getloadavg()[0],
                load_max=max([r.get("loadavg_start", 0) for c in cases for r in c["results"]] + [load_start]),
                wall_s=time.perf_counter() - t_start)
    md = report(cases, meta)
    if a.plot:
        plot_scaling(cases, a.plot, f"{device} · {meta['date']}")
    for path, text in ((a.json, json.dumps(dict(meta=meta, cases=cases), indent=1)), (a.md, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".part", "w") as f:
                f.write(text)
            os.replace(path + ".part", path)
    print()
    print(md)


if __name__ == "__main__":
    main()
