"""``run.py --suite``: both benchmarks × both protocols × T = 2, 3, all, for every registry combo.

    python benchmarks/quality/run.py --suite all              # digits + diffusion, rewrite RESULTS.md + README
    python benchmarks/quality/run.py --suite diffusion        # one benchmark (the other's cached rows stay)
    python benchmarks/quality/run.py --suite all --methods knots tsvm   # score only these methods,
                                                              # merged with the cached results
    python benchmarks/quality/run.py --suite all --methods tsv "do[recombine=v2]" --plugins none
                                                              # named options, no +D/+O/+DO variants
    python benchmarks/quality/run.py --suite all --quick      # smoke run: seed 0, T=2, few combos; writes nothing

Results: ``benchmarks/out/quality_protocols.json`` (every cell, per seed; the cache that
``--methods`` merges into) and ``benchmarks/out/quality_mean_rank.json`` (mean rank on val).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import domerge_core
import protocols as P

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STORE = os.environ.get("QUALITY_STORE") or os.path.join(ROOT, "benchmarks", "out", "quality_protocols.json")
RANKS_JSON = os.path.join(ROOT, "benchmarks", "out", "quality_mean_rank.json")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
BENCHES = ("digits", "diffusion")
DEFAULT_METHOD = domerge_core.default_method()   # what merge(), the CLI, the node and the panel pick


def diffusion_combos(methods: Optional[Sequence[str]], plugins: str = "all") -> List[P.Combo]:
    """Every method at its defaults and +DO; the single plug-ins (+D, +O) for ta only (cost).
    Combos named with options (``do[recombine=v2]``) are always kept."""
    return [c for c in P.combos(methods, plugins) if c.plugins in ("", "DO") or c.method == "ta" or "[" in c.label]


def with_refs(cmbs: List[P.Combo], methods: Optional[Sequence[str]]) -> List[P.Combo]:
    if methods is None or "ta" in methods:
        return P.reference_combos() + cmbs
    return cmbs


# ----------------------------------------------------------------------------------------------
def build_digits(seeds, log):
    import run as R            # the ViT benchmark's loader (trains its cache if missing)
    import train as TRD
    from digits_bench import DigitsBench
    if not TRD.is_cached(seeds):
        log("digits cache missing: training")
        TRD.train_all(tuple(seeds), log=log)
    return [DigitsBench(R.SeedBench(s)) for s in seeds]


def build_diffusion(seeds, log, quick=False):
    import diffusion_train as TR
    from diffusion_bench import DiffusionBench
    if not TR.is_cached(seeds):
        log("diffusion cache missing: training (one-off, ~15 min on one thread)")
        TR.train_all(seeds, log=log)
    kw = dict(n_eval={"val": 6, "test": 6}, n_samples=4) if quick else {}
    return [DiffusionBench(s, **kw) for s in seeds]


def pictures(bench, store: Dict[str, Any], log, sizes=P.SIZES, out_dir: str = DOCS) -> List[str]:
    import pictures as PIC
    import protocols as Pr
    paths = []
    seed = str(bench.seed)
    for size in sizes:
        tasks = bench.subsets[size]
        loras = [bench.loras[t] for t in tasks]

        def lam_of(label):
            row = store.get(Pr.key("diffusion", "tuned", size, label), {})
            return (row.get("seeds", {}).get(seed) or {}).get("lam", 1.0)

        rows = [("base", None)] + [(f"{t} alone", bench.loras[t]) for t in tasks]
        rows.append(("stacked (ta, λ 1)", Pr.merge(Pr.Combo("s", "ta"), loras, 1.0, bench.seed)))
        lt, ld = lam_of("ta"), lam_of("do")
        rows.append((f"ta, tuned λ {lt:g}", Pr.merge(Pr.Combo("t", "ta"), loras, lt, bench.seed)))
        rows.append((f"do, tuned λ {ld:g}", Pr.merge(Pr.Combo("d", "do"), loras, ld, bench.seed)))
        rows.append((f"default ({DEFAULT_METHOD}, drop-in)", Pr.merge(Pr.Combo("x", DEFAULT_METHOD), loras, None, bench.seed)))
        imgs, cols = PIC.render(bench, rows, tasks)
        tag = size.replace("=", "").lower()
        path = os.path.join(out_dir, f"quality_diffusion_{tag}.png")
        PIC.save_grid(path, f"diffusion benchmark, {size} ({' + '.join(tasks)}), seed {bench.seed}; "
                            f"columns: prompt token × 3 sampler seeds", [r[0] for r in rows], imgs, cols)
        paths.append(path)
        log(f"  wrote {os.path.relpath(path, ROOT)}")
    return paths


# ----------------------------------------------------------------------------------------------
def md_bench(store, bench_name: str) -> str:
    extra = (("sample", "sample score"),) if bench_name == "diffusion" else ()
    metric = "normalized denoising gain" if bench_name == "diffusion" else "normalized accuracy"
    parts = []
    for p in P.PROTOCOLS:
        for sz in P.SIZES:
            head = {"tuned": "tuned (λ chosen on val from one grid, every method alike)",
                    "dropin": "drop-in (strengths 1, every option at its registry default)"}[p]
            parts.append(f"#### {bench_name}, {head}, {sz}\n\nTest {metric}"
                         + (" and sample score (judge on sampled pictures, merged ÷ own LoRA)" if extra else "")
                         + "; mean ± std over seeds; Δ in points, paired per seed.\n\n"
                         + P.md_cell_table(store, bench_name, p, sz, extra))
    return "\n\n".join(parts)


def md_diffusion_setup(benches) -> str:
    import diffusion_train as TR
    meta = json.load(open(os.path.join(TR.CACHE, "meta.json")))
    lines = ["| seed | " + " | ".join(TR.LORAS) + " |", "|---" * (len(TR.LORAS) + 1) + "|"]
    import run as R
    for b in benches:
        cells = []
        for t in TR.LORAS:
            info = meta["loras"].get(f"seed{b.seed}/{t}", {})
            cells.append(f"r{info.get('rank')} α{info.get('lora_alpha')} lr{info.get('lr')} "
                         f"‖ΔW‖={R.lora_norm(b.loras[t]):.2f}" if t in b.loras else "–")
        lines.append(f"| {b.seed} | " + " | ".join(cells) + " |")
    lines += ["", "Absolute references (test, mean over seeds): ε-MSE of the base and of each LoRA on "
                  "its own held-out pictures; judge score of the sampled pictures (P(concept), or P(styled) "
                  "for the style) with no LoRA and with the LoRA alone.", "",
              "| task | ε-MSE base | ε-MSE own LoRA | judge, base | judge, own LoRA |", "|---|---|---|---|---|"]
    refs = [b.references() for b in benches]
    for t in TR.LORAS:
        g = lambda k: np.mean([r[t][k] for r in refs if t in r])  # noqa: E731
        lines.append(f"| {t} | {g('loss_base'):.4f} | {g('loss_own'):.4f} | {g('judge_base'):.2f} | {g('judge_own'):.2f} |")
    lines += ["", "Subsets per seed: " + "; ".join(
        f"seed {b.seed}: T=2 {'+'.join(b.subsets['T=2'])}, T=3 {'+'.join(b.subsets['T=3'])}" for b in benches)]
    return "\n".join(lines)


def _means(store, bn: str, p: str, sz: str, metric: str = "test") -> Dict[str, float]:
    return {l: float(np.mean([s[metric] for s in r["seeds"].values()]))
            for l, r in P.rows_of(store, bn, p, sz) if "skipped" not in r}


def md_summary(store, ranks: Optional[List[Dict[str, Any]]] = None) -> str:
    """README: the default (drop-in and tuned) against stacking and tuned ta, the best combo of
    each protocol, test scores; then the mean-rank top 5 (validation, combos scored in every cell)."""
    d = DEFAULT_METHOD
    lines = [f"| benchmark | T | stacking | tuned `ta` | default `{d}`, drop-in | Δ vs tuned `ta` | "
             f"Δ vs stacking | default `{d}`, tuned | best drop-in combo | best tuned combo |",
             "|---" * 10 + "|"]
    for bn in BENCHES:
        for sz in P.SIZES:
            dr, tu = _means(store, bn, "dropin", sz), _means(store, bn, "tuned", sz)
            if not dr or not tu:
                continue
            g = lambda m, l: f"{100 * m[l]:.1f}" if l in m else "–"  # noqa: E731
            dd = lambda a, b: f"{100 * (dr[a] - b):+.1f}" if a in dr else "–"  # noqa: E731
            bd, bt = max(dr, key=dr.get), max(tu, key=tu.get)
            lines.append(f"| {bn} | {sz} | {g(dr, 'stacking (ta, λ=1)')} | {g(tu, 'ta')} | {g(dr, d)} | "
                         f"{dd(d, tu.get('ta', float('nan')))} | {dd(d, dr.get('stacking (ta, λ=1)', float('nan')))} | "
                         f"{g(tu, d)} | {bd} {100 * dr[bd]:.1f} | {bt} {100 * tu[bt]:.1f} |")
    if ranks:
        n_cells = max(r["n_cells"] for r in ranks)
        full = [r for r in ranks if r["n_cells"] == n_cells]
        lines += ["", f"Mean rank on the validation splits over the {n_cells} cells (benchmark × protocol × T), "
                      f"{len(full)} combos scored in every cell; top 5 and the default:", "",
                  "| rank | combo | mean rank |", "|---|---|---|"]
        for i, r in enumerate(full):
            if i < 5 or r["label"] == d:
                lines.append(f"| {i + 1} | {'**' + r['label'] + '**' if r['label'] == d else r['label']} | "
                             f"{r['mean_rank']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def run_suite(suite: str, seeds: Sequence[int], methods: Optional[Sequence[str]], quick: bool, write: bool,
              log=print, protocols: Sequence[str] = P.PROTOCOLS, sizes: Optional[Sequence[str]] = None,
              report_only: bool = False, plugins: str = "all") -> Dict[str, Any]:
    from run import write_block
    torch.set_num_threads(1)
    t_start, c_start = time.time(), time.process_time()
    store = {} if quick else P.load_store(STORE)
    timings: Dict[str, float] = {}
    names = BENCHES if suite == "all" else (suite,)
    sizes = ("T=2",) if quick else (sizes or P.SIZES)
    diff_benches = []
    if report_only:              # tables, README and pictures from the stored results, no merging
        diff_benches = build_diffusion(seeds, log) if os.path.exists(os.path.join(HERE, "cache", "diffusion")) else []
        names = ()
    for bn in names:
        t0 = time.time()
        log(f"== {bn}")
        if bn == "digits":
            benches = build_digits(seeds, log)
            cmbs = with_refs(P.combos(methods, plugins), methods)
        else:
            benches = diff_benches = build_diffusion(seeds, log, quick)
            cmbs = with_refs(diffusion_combos(methods, plugins), methods)
        if quick:
            cmbs = [c for c in cmbs if c.label in ("stacking (ta, λ=1)", "ta", "do")]
        P.run_grid(benches, bn, cmbs, store, log, protocols=protocols, sizes=sizes)
        timings[bn] = time.time() - t0
        log(f"== {bn} done in {timings[bn]:.0f}s wall")
        if not quick:
            P.save_store(STORE, store)
    ranks = P.mean_ranks(store, BENCHES, "val")
    if not quick:
        P.save_store(RANKS_JSON, {"metric": "val", "cells": "benchmark|protocol|size", "ranks": ranks})
    out = {"store": store, "ranks": ranks, "timings": timings}
    if quick or not write:
        if diff_benches and quick:
            import tempfile
            d = tempfile.mkdtemp(prefix="quality_quick_")
            pictures(diff_benches[0], store, log, sizes=sizes, out_dir=d)
        log(f"quick/no-write run: {time.time() - t_start:.0f}s wall")
        return out
    if diff_benches:
        t0 = time.time()
        pictures(diff_benches[0], store, log)
        timings["pictures"] = time.time() - t0
    wall, cpu = time.time() - t_start, time.process_time() - c_start
    for bn in BENCHES:
        write_block(RESULTS_MD, f"protocols-{bn}", md_bench(store, bn))
    if diff_benches:
        write_block(RESULTS_MD, "diffusion-setup", md_diffusion_setup(diff_benches))
    write_block(RESULTS_MD, "mean-rank", P.md_mean_ranks(ranks, BENCHES))
    if report_only:
        import re
        text = open(RESULTS_MD).read()
        stamp = "\n\n".join(m.strip() for m in re.findall(r"<!-- BEGIN timing-suite-[a-z]+ -->(.*?)<!-- END", text, re.S))
        write_block(README, "quality-summary", md_summary(store, ranks) + ("\n\n" + stamp if stamp else ""))
        return out
    stamp = (f"`run.py --suite {suite}" + (f" --methods {' '.join(methods)}" if methods else "") +
             f"`, seeds {list(seeds)}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) +
             f"; total {wall:.0f}s wall, {cpu:.0f}s CPU, one thread")
    write_block(RESULTS_MD, f"timing-suite-{suite}", stamp)
    write_block(README, "quality-summary", md_summary(store, ranks) + "\n\n" + stamp.replace("`run.py", "`python benchmarks/quality/run.py"))
    log(stamp)
    return out
