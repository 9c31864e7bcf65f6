"""Scoring protocols shared by both quality benchmarks (digits ViT and diffusion).

A *bench* is one seed of one benchmark. It provides
``loras: Dict[task, Lora]``, ``subsets: Dict[size, List[task]]`` (sizes "T=2", "T=3", "all"),
``score(lora, tasks, split) -> Dict[task, float]`` (normalized: 1 = the task's own LoRA, 0 = no
LoRA) and optionally ``extra_test(lora, tasks) -> Dict[metric, Dict[task, float]]`` (more test
metrics, e.g. the diffusion sample metric).

Two protocols, the same for every method/plug-in combination the registry holds:

- ``tuned``: λ from one grid (the bench's ``lam_grid``), chosen by the mean val score;
  methods without ``lam`` are scored once. Strengths 1.
- ``dropin``: strengths 1 for every LoRA and every parameter at its registry default — what a
  user gets by dragging nodes.

Reference rows in both: ``stacking`` (ta at λ 1, strengths 1: plain LoRA stacking) and
``average`` (ta, strengths 1/T, λ 1). Combos come from `combos()`: every registered method at
its defaults, plus ``+D`` / ``+O`` / ``+DO`` (decouple / orthogonalize plug-ins) where the method
has them off by default (``plugins="lean"``: only ``+DO``, for the costlier benchmark).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import domerge_core
import domerge_core.methods  # noqa: F401  (the registry)

PROTOCOLS = ("tuned", "dropin")
SIZES = ("T=2", "T=3", "all")


@dataclass
class Combo:
    label: str
    method: str
    params: Dict[str, Any] = field(default_factory=dict)
    fixed_lam: Optional[float] = None      # reference rows: λ fixed in both protocols
    equal_weights: bool = False            # strengths 1/T
    plugins: str = ""                      # "", "D", "O", "DO"


def reference_combos() -> List[Combo]:
    return [Combo("stacking (ta, λ=1)", "ta", {}, fixed_lam=1.0),
            Combo("average (ta, w=1/T, λ=1)", "ta", {}, fixed_lam=1.0, equal_weights=True)]


def _value(text: str) -> Any:
    """``true``/``false``, a number, or the text itself (a choice)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_combo(name: str) -> Combo:
    """``"do[recombine=v2,orth_gamma=0.5]"`` → a combo of ``do`` with those options (label = the
    name as written); a plain name is the method at its defaults. Unknown methods or options raise."""
    if "[" not in name:
        domerge_core.methods.get_method(name)
        return Combo(name, name, {})
    method, rest = name.split("[", 1)
    if not rest.endswith("]"):
        raise ValueError(f"combo {name!r}: expected method[key=value,...]")
    params = {}
    for item in filter(None, rest[:-1].split(",")):
        k, _, v = item.partition("=")
        params[k.strip()] = _value(v)
    known = {p.name for p in domerge_core.methods.get_method(method).all_params()}
    bad = [k for k in params if k not in known]
    if bad:
        raise ValueError(f"combo {name!r}: {method} has no option(s) {bad}")
    plug = "".join(t for t, k in (("D", "decouple"), ("O", "orthogonalize")) if params.get(k))
    return Combo(name, method, params, plugins=plug)


def combos(methods: Optional[Iterable[str]] = None, plugins: str = "all") -> List[Combo]:
    """Every method in the registry at its defaults, and its plug-in variants (``plugins``: "all"
    = +D, +O, +DO; "lean" = +DO only; "none" = the defaults only). ``methods`` may also name
    combos with options, ``do[recombine=v2]`` (`parse_combo`): scored as written, no plug-in variants."""
    want = None if methods is None else set(methods)
    out: List[Combo] = [parse_combo(m) for m in (methods or ()) if "[" in m]
    if want is not None:
        want = {m for m in want if "[" not in m}
    for spec in domerge_core.methods.list_methods():
        if want is not None and spec.name not in want:
            continue
        names = {p.name for p in spec.all_params()}
        d = spec.defaults()
        out.append(Combo(spec.name, spec.name, {}))
        if plugins == "none" or not {"decouple", "orthogonalize"} <= names or d.get("decouple") or d.get("orthogonalize"):
            continue
        variants = (("D", True, False), ("O", False, True), ("DO", True, True)) if plugins == "all" \
            else (("DO", True, True),)
        for tag, dd, oo in variants:
            out.append(Combo(f"{spec.name} +{tag}", spec.name, {"decouple": dd, "orthogonalize": oo}, plugins=tag))
    return out


def has_lam(method: str) -> bool:
    return any(p.name == "lam" for p in domerge_core.methods.get_method(method).all_params())


def merge(combo: Combo, loras, lam: Optional[float], seed: int, cache=None):
    params = dict(combo.params)
    if lam is not None:
        params["lam"] = lam
    weights = [1.0 / len(loras)] * len(loras) if combo.equal_weights else [1.0] * len(loras)
    return domerge_core.merge(loras, method=combo.method, params=params, weights=weights, device="cpu",
                              seed=seed, cache=cache).lora


def _cache():
    try:
        return domerge_core.MergeCache()
    except Exception:
        return None


def evaluate(bench, combo: Combo, protocol: str, size: str) -> Dict[str, Any]:
    """One (combo, protocol, size) on one seed: val and test scores, the λ used, timing."""
    tasks = bench.subsets[size]
    loras = [bench.loras[t] for t in tasks]
    t0 = time.time()
    cache = _cache()
    if combo.fixed_lam is not None:
        grid: Sequence[Optional[float]] = (combo.fixed_lam,)
    elif protocol == "tuned" and has_lam(combo.method):
        grid = bench.lam_grid
    else:
        grid = (None,)                       # drop-in: the registry default
    best, curve = None, []
    for lam in grid:
        merged = merge(combo, loras, lam, bench.seed, cache)
        val = bench.score(merged, tasks, "val")
        s = float(np.mean(list(val.values())))
        curve.append((lam, s))
        if best is None or s > best[0] + 1e-12:
            best = (s, lam, merged, val)
        elif len(curve) >= 2 and curve[-2][1] < best[0]:
            break                            # unimodal in λ: two in a row below the best
    s, lam, merged, val = best
    test = bench.score(merged, tasks, "test")
    rec = {"lam": lam, "val": s, "val_tasks": val, "test": float(np.mean(list(test.values()))),
           "test_tasks": test, "curve": curve}
    extra = getattr(bench, "extra_test", None)
    if extra is not None:
        for k, v in extra(merged, tasks).items():
            rec[f"test_{k}_tasks"] = v
            rec[f"test_{k}"] = float(np.mean(list(v.values())))
    rec["seconds"] = time.time() - t0
    return rec


# ----------------------------------------------------------------------------------------------
# results store: {key "bench|protocol|size|label": {"method", "plugins", "seeds": {seed: rec}}}
# ----------------------------------------------------------------------------------------------
def key(bench_name: str, protocol: str, size: str, label: str) -> str:
    return f"{bench_name}|{protocol}|{size}|{label}"


def run_grid(benches: Sequence, bench_name: str, cmbs: Sequence[Combo], store: Dict[str, Any], log,
             protocols: Sequence[str] = PROTOCOLS, sizes: Sequence[str] = SIZES) -> None:
    for protocol in protocols:
        for size in sizes:
            for c in cmbs:
                k = key(bench_name, protocol, size, c.label)
                t0 = time.time()
                row = {"method": c.method, "plugins": c.plugins, "reference": c.fixed_lam is not None,
                       "seeds": {}}
                try:
                    for b in benches:
                        row["seeds"][str(b.seed)] = evaluate(b, c, protocol, size)
                except NotImplementedError as e:
                    row = {"method": c.method, "skipped": f"NotImplementedError: {e}"}
                except Exception as e:             # an engine error is a finding, not a crash of the run
                    row = {"method": c.method, "skipped": f"{type(e).__name__}: {str(e)[:160]}"}
                store[k] = row
                if "skipped" in row:
                    log(f"  {k:55s} skipped: {row['skipped']}")
                else:
                    v = [r["test"] for r in row["seeds"].values()]
                    lams = [r["lam"] for r in row["seeds"].values()]
                    log(f"  {k:55s} test {100 * np.mean(v):7.2f} ± {100 * np.std(v):5.2f}  λ={lams} "
                        f"({time.time() - t0:.1f}s)")


def load_store(path: str) -> Dict[str, Any]:
    if os.path.exists(path):
        try:
            return json.load(open(path))
        except Exception:
            return {}
    return {}


def save_store(path: str, store: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(store, f, indent=1, default=str)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def fmt(v: Sequence[float]) -> str:
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"


def rows_of(store: Dict[str, Any], bench_name: str, protocol: str, size: str) -> List[Tuple[str, Dict[str, Any]]]:
    pre = f"{bench_name}|{protocol}|{size}|"
    return [(k[len(pre):], v) for k, v in store.items() if k.startswith(pre)]


def _paired(row, ref, metric="test") -> str:
    seeds = [s for s in row["seeds"] if s in ref.get("seeds", {})]
    if not seeds:
        return "–"
    d = np.array([row["seeds"][s][metric] - ref["seeds"][s][metric] for s in seeds])
    return f"{100 * d.mean():+.1f} ({', '.join(f'{100 * x:+.1f}' for x in d)})"


def md_cell_table(store: Dict[str, Any], bench_name: str, protocol: str, size: str,
                  extra_metrics: Sequence[Tuple[str, str]] = ()) -> str:
    """One table: rows = combos; test score, paired Δ vs stacking and vs ta, λ per seed."""
    rows = rows_of(store, bench_name, protocol, size)
    if not rows:
        return "_(not run)_"
    stack = dict(rows).get("stacking (ta, λ=1)")
    ta = dict(rows).get("ta")
    head = "| method | test score (%) | " + "".join(f"{lab} (%) | " for _, lab in extra_metrics) + \
           "Δ vs stacking, per seed | Δ vs ta, per seed | λ per seed |"
    lines = [head, "|---" * (5 + len(extra_metrics)) + "|"]
    for label, row in rows:
        if "skipped" in row:
            lines.append(f"| {label} | n/a: {row['skipped'][:70]} |" + " |" * (3 + len(extra_metrics)))
            continue
        rs = list(row["seeds"].values())
        ex = "".join(f"{fmt([r.get('test_' + m, float('nan')) for r in rs])} | " for m, _ in extra_metrics)
        lams = ", ".join("–" if r["lam"] is None else f"{r['lam']:g}" for r in rs)
        ds = "–" if stack is None or row is stack or "skipped" in stack else _paired(row, stack)
        dt = "–" if ta is None or row is ta or "skipped" in ta else _paired(row, ta)
        name = f"**{label}**" if label in (domerge_core.default_method(), "do", "stacking (ta, λ=1)") else label
        lines.append(f"| {name} | {fmt([r['test'] for r in rs])} | {ex}{ds} | {dt} | {lams} |")
    return "\n".join(lines)


def mean_ranks(store: Dict[str, Any], bench_names: Sequence[str], metric: str = "val") -> List[Dict[str, Any]]:
    """Each combo's rank (1 = best, by the mean over seeds of ``metric``) in every
    (bench, protocol, size) cell, and the mean over the cells it appears in."""
    ranks: Dict[str, Dict[str, float]] = {}
    for bn in bench_names:
        for p in PROTOCOLS:
            for sz in SIZES:
                rows = [(lab, r) for lab, r in rows_of(store, bn, p, sz) if "skipped" not in r]
                if not rows:
                    continue
                scores = {lab: float(np.mean([s[metric] for s in r["seeds"].values()])) for lab, r in rows}
                order = sorted(scores, key=lambda l: -scores[l])
                for i, lab in enumerate(order):
                    ranks.setdefault(lab, {})[f"{bn}|{p}|{sz}"] = float(i + 1)
    out = []
    for lab, cells in ranks.items():
        out.append({"label": lab, "mean_rank": float(np.mean(list(cells.values()))), "cells": cells,
                    "n_cells": len(cells)})
    out.sort(key=lambda r: r["mean_rank"])
    return out


def md_mean_ranks(ranks: List[Dict[str, Any]], bench_names: Sequence[str]) -> str:
    cols = [f"{bn}|{p}|{sz}" for bn in bench_names for p in PROTOCOLS for sz in SIZES]
    short = [c.replace("|", " ").replace("dropin", "drop-in") for c in cols]
    lines = ["| method | mean rank | cells | " + " | ".join(short) + " |", "|---" * (3 + len(cols)) + "|"]
    for r in ranks:
        cells = " | ".join(f"{r['cells'][c]:g}" if c in r["cells"] else "–" for c in cols)
        lines.append(f"| {r['label']} | {r['mean_rank']:.2f} | {r['n_cells']} | {cells} |")
    return "\n".join(lines)
