"""Merge the cached task LoRAs with every method and score the merged model on real tasks.

    python benchmarks/quality/run.py             # train if the cache is missing, then table + magvar
    python benchmarks/quality/run.py sweep       # the reconstructed-choice sweep (validation only)
    python benchmarks/quality/run.py all         # table + magvar + sweep
    python benchmarks/quality/run.py --suite all # both benchmarks (digits ViT, diffusion) × both
                                                 # protocols × T = 2, 3, all (suite.py); --quick, --methods

All merging goes through ``domerge_core.merge``; this file only applies a merged LoRA to the
backbone (ΔW = scale·up@down per module key) and scores it.

Scores: *normalized accuracy* of task t = accuracy of the merged backbone with task t's own head
÷ accuracy of the backbone with task t's own LoRA and head. Per seed the mean over the 8 tasks;
the table shows mean ± std over seeds. λ (every method that declares ``lam``) is picked from the
same grid by the mean normalized accuracy on the *val* split (scanning the grid upwards and
stopping once two values in a row score below the best so far); the table is on *test*.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import domerge_core  # noqa: E402
from domerge_core import Lora, LoraModule  # noqa: E402

import data as D  # noqa: E402
import train as TR  # noqa: E402

LAM_GRID: Tuple[float, ...] = (0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5, 2.0)
OUT_JSON = os.path.join(ROOT, "benchmarks", "out", "quality.json")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
PLOT = os.path.join(ROOT, "docs", "magnitude_variance.png")
SWEEP_PLOT = os.path.join(ROOT, "docs", "quality_sweep.png")


# ----------------------------------------------------------------------------------------------
# loading and scoring
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskLora:
    task: str
    lora: Lora
    head: torch.nn.Linear
    meta: Dict[str, str]


def as_lora(task: str, variant: str, factors, scale: float, meta) -> Lora:
    mods = {k: LoraModule.from_tensors(k, up, down, scale) for k, (up, down) in factors.items()}
    return Lora(modules=mods, format="peft", source=f"{variant}/{task}.safetensors", metadata=dict(meta),
                base_model="digitvit")


class SeedBench:
    """One seed: the backbone, both LoRA variants per task, val/test data; scoring helpers."""

    def __init__(self, seed: int):
        self.seed = seed
        self.model = TR.load_backbone(seed)
        tasks = D.build(seed)
        self.loras: Dict[str, Dict[str, TaskLora]] = {}
        for v in TR.VARIANTS:
            self.loras[v] = {}
            for t in D.TASKS:
                f, s, head, meta = TR.load_lora(seed, v, t)
                self.loras[v][t] = TaskLora(t, as_lora(t, v, f, s, meta), head, meta)
        self.x: Dict[str, torch.Tensor] = {}
        self.y: Dict[str, Dict[str, torch.Tensor]] = {}
        self.slices: Dict[str, Dict[str, slice]] = {}
        for split in ("val", "test"):
            xs, pos = [], 0
            self.y[split], self.slices[split] = {}, {}
            for t in D.TASKS:
                td = tasks[t][split]
                xs.append(td.x)
                self.y[split][t] = td.y
                self.slices[split][t] = slice(pos, pos + len(td.y))
                pos += len(td.y)
            self.x[split] = torch.cat(xs)
        self._individual: Dict[Tuple[str, str, str], float] = {}
        self.n_evals = 0

    # the only place a LoRA touches the model: ΔW = scale · up @ down per canonical key
    def _apply(self, lora: Optional[Lora]) -> None:
        deltas = {} if lora is None else {m.key: m.delta(torch.float32) for m in lora}
        self.model.set_deltas(deltas)

    def accuracies(self, lora: Optional[Lora], split: str, heads: Dict[str, torch.nn.Linear],
                   tasks: Sequence[str] = D.TASKS) -> Dict[str, float]:
        """Per-task accuracy of the backbone with ``lora`` applied, each task with its own head."""
        self._apply(lora)
        out = {}
        with torch.no_grad():
            if len(tasks) == len(D.TASKS):
                feats = self.model(self.x[split])
                for t in tasks:
                    sl = self.slices[split][t]
                    out[t] = (heads[t](feats[sl]).argmax(-1) == self.y[split][t]).float().mean().item()
            else:
                for t in tasks:
                    sl = self.slices[split][t]
                    f = self.model(self.x[split][sl])
                    out[t] = (heads[t](f).argmax(-1) == self.y[split][t]).float().mean().item()
        self.model.set_deltas({})
        self.n_evals += 1
        return out

    def individual(self, variant: str, task: str, split: str) -> float:
        k = (variant, task, split)
        if k not in self._individual:
            tl = self.loras[variant][task]
            self._individual[k] = self.accuracies(tl.lora, split, {task: tl.head}, [task])[task]
        return self._individual[k]


@dataclass
class LoraSet:
    """One choice of variant per task (the main benchmark: all "hetero")."""
    name: str
    variants: Tuple[str, ...]

    def members(self, b: SeedBench) -> List[TaskLora]:
        return [b.loras[v][t] for v, t in zip(self.variants, D.TASKS)]


HETERO = LoraSet("hetero", tuple("hetero" for _ in D.TASKS))


def normalized(b: SeedBench, s: LoraSet, accs: Dict[str, float], split: str) -> Dict[str, float]:
    return {t: accs[t] / max(b.individual(v, t, split), 1e-6) for v, t in zip(s.variants, D.TASKS)}


# ----------------------------------------------------------------------------------------------
# merging (through domerge_core.merge only)
# ----------------------------------------------------------------------------------------------
@dataclass
class MethodCfg:
    label: str
    method: str
    params: Dict[str, Any] = field(default_factory=dict)
    tune_lam: bool = True
    equal_weights: bool = False        # weights 1/T (plain averaging)


def method_params(method: str) -> Dict[str, Any]:
    return {p.name: p for p in domerge_core.get_method(method).all_params()}


def has_param(method: str, name: str) -> bool:
    return name in method_params(method)


def make_cache():
    try:
        return domerge_core.MergeCache()
    except Exception:            # the engine may not provide one yet
        return None


def do_merge(cfg: MethodCfg, loras: List[Lora], lam: Optional[float], seed: int, cache=None) -> Tuple[Lora, Dict]:
    params = dict(cfg.params)
    if lam is not None:
        params["lam"] = lam
    weights = [1.0 / len(loras)] * len(loras) if cfg.equal_weights else None
    res = domerge_core.merge(loras, method=cfg.method, params=params, weights=weights, device="cpu",
                             seed=seed, cache=cache)
    return res.lora, res.report


def evaluate_cfg(b: SeedBench, s: LoraSet, cfg: MethodCfg, lam_grid=LAM_GRID, splits=("val", "test")
                 ) -> Dict[str, Any]:
    """λ picked on val (mean normalized accuracy), then scored on the other splits."""
    members = s.members(b)
    loras = [m.lora for m in members]
    heads = {m.task: m.head for m in members}
    cache = make_cache()
    tune = cfg.tune_lam and has_param(cfg.method, "lam")
    grid = lam_grid if tune else (None,)
    best = None
    curve = []
    t0 = time.time()
    for lam in grid:
        merged, report = do_merge(cfg, loras, lam, b.seed, cache)
        val = normalized(b, s, b.accuracies(merged, "val", heads), "val")
        score = float(np.mean(list(val.values())))
        curve.append((lam, score))
        if best is None or score > best[0] + 1e-12:
            best = (score, lam, merged, report)
        # the curves are unimodal in λ: stop once two grid values in a row fall below the best
        elif len(curve) >= 2 and curve[-2][1] < best[0] and lam is not None:
            break
    score, lam, merged, report = best
    out = {"lam": lam, "val_norm": score, "val_curve": curve, "seconds": time.time() - t0,
           "report": _small_report(report)}
    for split in splits:
        if split == "val":
            continue
        accs = b.accuracies(merged, split, heads)
        norm = normalized(b, s, accs, split)
        out[f"{split}_acc"] = accs
        out[f"{split}_norm_tasks"] = norm
        out[f"{split}_norm"] = float(np.mean(list(norm.values())))
    return out


def _small_report(report: Dict) -> Dict:
    """The scalar diagnostics of a MergeResult.report (cosines before/after, ‖δ‖/‖factor‖)."""
    keep: Dict[str, Any] = {}
    report = report or {}
    for k, v in report.items():
        if isinstance(v, (int, float, str, bool)):
            keep[k] = v
    for k, v in (report.get("diagnostics") or {}).items():
        if isinstance(v, (int, float)):
            keep[k] = float(v)
    mods = [m for m in (report.get("modules") or {}).values() if isinstance(m, dict)]
    for k in ("rel_delta_A", "rel_delta_B"):
        vals = [float(np.mean(m[k])) for m in mods if m.get(k) is not None]
        if vals:
            keep[k + "_mean"] = float(np.mean(vals))
    return keep


# ----------------------------------------------------------------------------------------------
# diagnostics computed here (a statistic of the inputs, not merging)
# ----------------------------------------------------------------------------------------------
def magnitude_variance(loras: List[Lora]) -> float:
    """method.md Diagnostics: per module s_i = ‖ΔW_i‖_F normalised by the mean over i; variance
    over i; mean over modules. ‖BA‖_F² = tr((BᵀB)(AAᵀ)) keeps it at r×r."""
    vals = []
    for key in loras[0].modules:
        s = []
        for l in loras:
            up, down = l[key].scaled_factors(torch.float64)
            s.append(math.sqrt(max(float(torch.trace((up.T @ up) @ (down @ down.T))), 0.0)))
        s = np.asarray(s)
        s = s / s.mean()
        vals.append(float(s.var()))
    return float(np.mean(vals))


def lora_norm(l: Lora) -> float:
    tot = 0.0
    for m in l:
        up, down = m.scaled_factors(torch.float64)
        tot += float(torch.trace((up.T @ up) @ (down @ down.T)))
    return math.sqrt(tot)


# ----------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------
BASES = ("ta", "ties", "dare", "dare_ties")


def table_configs() -> List[MethodCfg]:
    cfgs = [MethodCfg("average (ta, w=1/T, λ=1)", "ta", {}, tune_lam=False, equal_weights=True)]
    for base in BASES:
        for d, o in ((False, False), (True, False), (False, True), (True, True)):
            tag = base + ("" if not (d or o) else " +" + ("D" if d else "") + ("O" if o else ""))
            cfgs.append(MethodCfg(tag, base, {"decouple": d, "orthogonalize": o}))
    cfgs.append(MethodCfg("do (defaults)", "do", {}))
    return cfgs


def available(cfg: MethodCfg) -> Optional[str]:
    try:
        specs = method_params(cfg.method)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    missing = [k for k in cfg.params if k not in specs]
    return f"no parameter(s) {missing}" if missing else None


def part_table(benches: List[SeedBench], log, extra: Sequence[MethodCfg] = ()) -> Dict[str, Any]:
    res: Dict[str, Any] = {"rows": [], "individual": {}, "floor": {},
                           "do_defaults": domerge_core.get_method("do").defaults(),
                           "other_defaults": {"ties.density": domerge_core.get_method("ties").defaults()["density"],
                                              "dare.drop_rate": domerge_core.get_method("dare").defaults()["drop_rate"]}}
    for b in benches:
        ind = {t: {sp: b.individual("hetero", t, sp) for sp in ("val", "test")} for t in D.TASKS}
        res["individual"][b.seed] = ind
        heads = {t: b.loras["hetero"][t].head for t in D.TASKS}
        accs = b.accuracies(None, "test", heads)
        res["floor"][b.seed] = float(np.mean(list(normalized(b, HETERO, accs, "test").values())))
    for cfg in list(table_configs()) + list(extra):
        why = available(cfg)
        row = {"label": cfg.label, "method": cfg.method, "params": cfg.params, "seeds": {}}
        if why:
            row["skipped"] = why
            log(f"  {cfg.label:28s} skipped: {why}")
            res["rows"].append(row)
            continue
        t0 = time.time()
        for b in benches:
            try:
                row["seeds"][b.seed] = evaluate_cfg(b, HETERO, cfg)
            except NotImplementedError as e:
                row["skipped"] = f"NotImplementedError: {e}"
                break
        if "skipped" in row:
            log(f"  {cfg.label:28s} skipped: {row['skipped']}")
        else:
            v = [r["test_norm"] for r in row["seeds"].values()]
            log(f"  {cfg.label:28s} test norm acc {100 * np.mean(v):6.2f} ± {100 * np.std(v):5.2f}  "
                f"λ={[r['lam'] for r in row['seeds'].values()]}  ({time.time() - t0:.1f}s)")
        res["rows"].append(row)
    return res


def magvar_sets(seed: int, n_mix: int) -> List[LoraSet]:
    rng = random.Random(900 + seed)
    sets = [HETERO, LoraSet("uniform", tuple("uniform" for _ in D.TASKS))]
    seen = {s.variants for s in sets}
    while len(sets) < 2 + n_mix:
        v = tuple(rng.choice(TR.VARIANTS) for _ in D.TASKS)
        if v not in seen:
            seen.add(v)
            sets.append(LoraSet("mix" + "".join("h" if x == "hetero" else "u" for x in v), v))
    return sets


def part_magvar(benches: List[SeedBench], log, n_mix: int = 6) -> Dict[str, Any]:
    """Across LoRA sets: magnitude variance vs normalized accuracy of TA (and of DO)."""
    pts = []
    cfgs = [MethodCfg("ta", "ta", {}), MethodCfg("do", "do", {})]
    cfgs = [c for c in cfgs if available(c) is None]
    for b in benches:
        for s in magvar_sets(b.seed, n_mix):
            loras = [m.lora for m in s.members(b)]
            mv = magnitude_variance(loras)
            pt = {"seed": b.seed, "set": s.name, "magvar": mv}
            for c in cfgs:
                try:
                    r = evaluate_cfg(b, s, c)
                except NotImplementedError:
                    continue
                pt[c.method] = r["test_norm"]
                pt[c.method + "_lam"] = r["lam"]
            pts.append(pt)
            log(f"  seed {b.seed} {s.name:12s} magvar {mv:7.3f}  " +
                "  ".join(f"{c.method} {100 * pt[c.method]:.2f}" for c in cfgs if c.method in pt))
    out: Dict[str, Any] = {"points": pts}
    for m in ("ta", "do"):
        xs = [p["magvar"] for p in pts if m in p]
        ys = [p[m] for p in pts if m in p]
        if len(xs) > 2:
            out[f"pearson_{m}"] = float(np.corrcoef(xs, ys)[0, 1])
            out[f"spearman_{m}"] = _spearman(xs, ys)
            out[f"slope_{m}"] = float(np.polyfit(xs, ys, 1)[0])
    both = [p for p in pts if "ta" in p and "do" in p]
    if len(both) > 2:
        out["spearman_do_minus_ta"] = _spearman([p["magvar"] for p in both], [p["do"] - p["ta"] for p in both])
        out["mean_do_minus_ta"] = float(np.mean([p["do"] - p["ta"] for p in both]))
    # within-seed correlation (removes the seed-to-seed offset)
    for m in ("ta", "do"):
        rs = []
        for b in benches:
            xs = [p["magvar"] for p in pts if m in p and p["seed"] == b.seed]
            ys = [p[m] for p in pts if m in p and p["seed"] == b.seed]
            if len(xs) > 2:
                rs.append(_spearman(xs, ys))
        if rs:
            out[f"spearman_within_seed_{m}"] = rs
    return out


def _spearman(x, y) -> float:
    rx = np.argsort(np.argsort(x))
    ry = np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def plot_magvar(mv: Dict[str, Any], path: str = PLOT) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = mv["points"]
    colors = {0: "tab:blue", 1: "tab:orange", 2: "tab:green", 3: "tab:red", 4: "tab:purple"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for m, marker, lab in (("ta", "o", "task arithmetic"), ("do", "^", "DO-Merging")):
        sel = [p for p in pts if m in p]
        if not sel:
            continue
        xs = np.array([p["magvar"] for p in sel])
        ys = np.array([100 * p[m] for p in sel])
        cs = [colors.get(int(p["seed"]), "k") for p in sel]
        if m == "ta":
            ax.scatter(xs, ys, c=cs, marker=marker, s=36)
        else:
            ax.scatter(xs, ys, marker=marker, s=44, facecolors="none", edgecolors=cs, linewidths=1.2)
        if len(xs) > 2:
            k, c0 = np.polyfit(xs, ys, 1)
            xx = np.linspace(xs.min(), xs.max(), 10)
            ax.plot(xx, k * xx + c0, ls="-" if m == "ta" else "--", color="0.3", lw=1,
                    label=f"{lab} ({'●' if m == 'ta' else '△'}): ρ={mv.get('spearman_' + m, float('nan')):+.2f}, "
                          f"slope {k:+.1f} pts/unit")
    ax.set_xlabel("magnitude distribution variance of the LoRA set")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_title("merge quality vs magnitude variance (colour = seed)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    both = [p for p in pts if "ta" in p and "do" in p]
    if both:
        xs = np.array([p["magvar"] for p in both])
        ys = np.array([100 * (p["do"] - p["ta"]) for p in both])
        ax2.scatter(xs, ys, c=[colors.get(int(p["seed"]), "k") for p in both], s=36)
        ax2.axhline(0, color="0.5", lw=0.8)
        if len(xs) > 2:
            k, c0 = np.polyfit(xs, ys, 1)
            xx = np.linspace(xs.min(), xs.max(), 10)
            ax2.plot(xx, k * xx + c0, color="0.3", lw=1, label=f"ρ={_spearman(xs, ys):+.2f}, slope {k:+.1f} pts/unit")
            ax2.legend(fontsize=8)
        ax2.set_xlabel("magnitude distribution variance of the LoRA set")
        ax2.set_ylabel("DO − TA (normalized points)")
        ax2.set_title("does DO help more when magnitudes vary more?")
        ax2.grid(alpha=0.3)
    fig.suptitle("8 digit tasks, λ tuned on val; sets = hetero, uniform and per-task mixes", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- sweep of the reconstructed choices (validation split only) -------------------------------
def sweep_axes() -> List[Tuple[str, List[Any]]]:
    """One axis at a time around the `do` defaults; names as the registry declares them."""
    specs = method_params("do")
    axes: List[Tuple[str, List[Any]]] = []

    def choice_values(name):
        p = specs.get(name)
        return list(p.choices) if p is not None and p.type == "choice" else None

    if "balanced" in specs:
        axes.append(("balanced", [True, False]))
    if "orthogonalize" in specs:
        axes.append(("orthogonalize", [True, False]))
    if "orth_steps" in specs:
        axes.append(("orth_steps", [10, 30, 100, 300]))
    if "orth_gamma" in specs:
        axes.append(("orth_gamma", [0.01, 0.1, 0.3, 1.0, 10.0]))
    if "orth_lr" in specs:
        axes.append(("orth_lr", [0.1, 0.3, 1.0, 1.9]))
    for name in ("orth_optimizer", "recombine", "magnitude"):
        vals = choice_values(name)
        if vals:
            axes.append((name, vals))
    # always include the current default (the engine's defaults may move), drop values out of range
    out = []
    for name, vals in axes:
        p = specs[name]
        if p.default not in vals:
            vals = sorted(vals + [p.default]) if p.type in ("int", "float") else vals + [p.default]
        ok = []
        for v in vals:
            try:
                p.validate(v)
                ok.append(v)
            except Exception:
                pass
        out.append((name, ok))
    return out


def part_sweep(benches: List[SeedBench], log) -> Dict[str, Any]:
    defaults = domerge_core.get_method("do").defaults()
    res: Dict[str, Any] = {"defaults": {k: v for k, v in defaults.items()}, "axes": {}}
    base_cache: Dict[str, float] = {}
    for name, vals in sweep_axes():
        res["axes"][name] = []
        for v in vals:
            params = {name: v}
            cfg = MethodCfg(f"do {name}={v}", "do", params)
            key = json.dumps({**defaults, **params}, sort_keys=True, default=str)
            t0 = time.time()
            if key in base_cache:
                vals_seed = base_cache[key]
            else:
                try:
                    vals_seed = [evaluate_cfg(b, HETERO, cfg, splits=("val",))["val_norm"] for b in benches]
                except Exception as e:          # an engine error is a finding, not a crash of the sweep
                    msg = f"{type(e).__name__}: {str(e)[:120]}"
                    res["axes"][name].append({"value": v, "error": msg, "is_default": defaults.get(name) == v})
                    log(f"  do {name}={v!s:8s} ERROR {msg}")
                    continue
                base_cache[key] = vals_seed
            res["axes"][name].append({"value": v, "val_norm": vals_seed,
                                      "is_default": defaults.get(name) == v})
            log(f"  do {name}={v!s:8s} val norm acc {100 * np.mean(vals_seed):6.2f} ± "
                f"{100 * np.std(vals_seed):5.2f} {'(default)' if defaults.get(name) == v else ''} "
                f"({time.time() - t0:.1f}s)")
    # choice axes: the per-axis best; numeric orth axes: a joint grid of each one's two best values
    best: Dict[str, Any] = {}
    top2: Dict[str, List[Any]] = {}
    for name, entries in res["axes"].items():
        entries = [e for e in entries if "val_norm" in e]
        if not entries:
            continue
        ranked = sorted(entries, key=lambda e: -np.mean(e["val_norm"]))
        if name in ("orth_steps", "orth_gamma", "orth_lr") and len(ranked) > 1:
            top2[name] = [e["value"] for e in ranked[:2]]
        elif not ranked[0]["is_default"]:
            best[name] = ranked[0]["value"]
    res["joint"] = []
    if top2:
        import itertools
        names = list(top2)
        cands = []
        for combo in itertools.product(*(top2[n] for n in names)):
            params = {**best, **dict(zip(names, combo))}
            key = json.dumps({**defaults, **params}, sort_keys=True, default=str)
            vals_seed = base_cache.get(key)
            if vals_seed is None:
                vals_seed = [evaluate_cfg(b, HETERO, MethodCfg("joint", "do", params), splits=("val",))["val_norm"]
                             for b in benches]
                base_cache[key] = vals_seed
            res["joint"].append({"params": params, "val_norm": vals_seed})
            log(f"  do joint {params}: val {fmt(vals_seed)}")
            cands.append((float(np.mean(vals_seed)), params))
        best = max(cands, key=lambda c: c[0])[1]
    best = {k: v for k, v in best.items() if defaults.get(k) != v}
    res["best_params"] = best
    for label, params in (("defaults", {}), ("sweep-best", best)):
        rs = [evaluate_cfg(b, HETERO, MethodCfg(label, "do", params)) for b in benches]
        res[label] = {"params": params, "val_norm": [r["val_norm"] for r in rs],
                      "test_norm": [r["test_norm"] for r in rs], "lam": [r["lam"] for r in rs]}
        log(f"  do {label} {params}: val {fmt(res[label]['val_norm'])}  test {fmt(res[label]['test_norm'])}")
    return res


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def fmt(v: Sequence[float]) -> str:
    return f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"


def _intkeys(tab: Dict[str, Any]) -> Dict[str, Any]:
    """JSON turns the seed keys into strings; turn them back."""
    tab = dict(tab)
    for k in ("floor", "individual"):
        tab[k] = {int(s): v for s, v in tab[k].items()}
    tab["rows"] = [{**r, "seeds": {int(s): v for s, v in r.get("seeds", {}).items()}} for r in tab["rows"]]
    return tab


def md_table(tab: Dict[str, Any]) -> str:
    tab = _intkeys(tab)
    seeds = sorted(tab["floor"])
    lines = ["| method | normalized acc. (test, %) | Δ vs ta, paired (points) | absolute acc. (test, %) "
             "| λ per seed (val) |", "|---|---|---|---|---|"]
    ta_row = next((r for r in tab["rows"] if r["label"] == "ta" and not r.get("skipped")), None)
    ind_abs = [np.mean([tab["individual"][s][t]["test"] for t in D.TASKS]) for s in seeds]
    lines.append(f"| individual LoRAs (reference) | 100 | – | {fmt(ind_abs)} | – |")
    lines.append(f"| no LoRA (backbone + task heads) | {fmt([tab['floor'][s] for s in seeds])} | – | – | – |")
    for row in tab["rows"]:
        if row.get("skipped"):
            lines.append(f"| {row['label']} | n/a ({row['skipped'][:60]}) | | | |")
            continue
        rs = [row["seeds"][s] for s in seeds if s in row["seeds"]]
        norm = [r["test_norm"] for r in rs]
        absa = [np.mean(list(r["test_acc"].values())) for r in rs]
        lams = ", ".join("–" if r["lam"] is None else f"{r['lam']:g}" for r in rs)
        if ta_row is not None and row is not ta_row:
            d = np.asarray(norm) - np.asarray([ta_row["seeds"][s]["test_norm"] for s in seeds if s in row["seeds"]])
            delta = f"{100 * d.mean():+.2f} ± {100 * d.std():.2f}"
        else:
            delta = "–"
        lines.append(f"| {row['label']} | {fmt(norm)} | {delta} | {fmt(absa)} | {lams} |")
    diag = []
    for row in tab["rows"]:
        if row.get("skipped") or row["method"] != "do":      # the +O rows share do's orth options
            continue
        reps = [row["seeds"][s].get("report", {}) for s in seeds if s in row["seeds"]]
        if not reps or "mean_abs_cos_after" not in reps[0]:
            continue
        g = lambda k: np.mean([r.get(k, float("nan")) for r in reps])  # noqa: E731
        diag.append(f"| {row['label']} | {g('mean_abs_cos_before'):.4f} → {g('mean_abs_cos_after'):.4f} | "
                    f"{100 * g('rel_delta_A_mean'):.1f} % / {100 * g('rel_delta_B_mean'):.1f} % |")
    if diag:
        lines += ["", "Orthogonalization diagnostics from `MergeResult.report` (mean over modules and seeds):", "",
                  "| row | mean abs. cosine between task updates, before → after | ‖δA‖/‖A‖ / ‖δB‖/‖B‖ |",
                  "|---|---|---|"] + diag
    if "do_defaults" in tab:
        lines.append("")
        lines.append("Registry defaults in this run (every row not naming an option uses them): `" +
                     json.dumps({k: v for k, v in tab["do_defaults"].items() if k not in ("decouple", "orthogonalize")})
                     + "`; " + ", ".join(f"{k} {v}" for k, v in tab.get("other_defaults", {}).items())
                     + " (registry defaults, not tuned).")
    return "\n".join(lines)


def md_per_task(tab: Dict[str, Any], labels=("ta", "ties", "ties +DO", "do (defaults)", "do (sweep-best")) -> str:
    tab = _intkeys(tab)
    seeds = sorted(tab["floor"])
    lines = ["| method | " + " | ".join(D.TASKS) + " |", "|---" * (len(D.TASKS) + 1) + "|"]
    for row in tab["rows"]:
        if not any(row["label"] == l or (l.endswith("(sweep-best") and row["label"].startswith(l)) for l in labels) \
                or row.get("skipped"):
            continue
        cells = []
        for t in D.TASKS:
            cells.append(f"{100 * np.mean([row['seeds'][s]['test_norm_tasks'][t] for s in seeds]):.1f}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def md_configs(benches: List[SeedBench]) -> str:
    lines = ["| seed | " + " | ".join(D.TASKS) + " |", "|---" * (len(D.TASKS) + 1) + "|"]
    for b in benches:
        cells = []
        for t in D.TASKS:
            tl = b.loras["hetero"][t]
            cells.append(f"r{tl.meta['rank']} α{float(tl.meta['lora_alpha']):g} lr{float(tl.meta['lr']):.0e} "
                         f"‖ΔW‖={lora_norm(tl.lora):.2f}")
        lines.append(f"| {b.seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def md_magvar(mv: Dict[str, Any]) -> str:
    lines = []
    for m in ("ta", "do"):
        if f"spearman_{m}" in mv:
            within = ", ".join(f"{r:+.2f}" for r in mv.get(f"spearman_within_seed_{m}", []))
            lines.append(f"- {m}: Spearman ρ = {mv[f'spearman_{m}']:+.2f}, Pearson r = {mv[f'pearson_{m}']:+.2f}, "
                         f"slope = {100 * mv[f'slope_{m}']:+.2f} points per unit of variance; "
                         f"within each seed ρ = {within}")
    if "spearman_do_minus_ta" in mv:
        lines.append(f"- DO − TA over all sets: mean {100 * mv['mean_do_minus_ta']:+.2f} points; Spearman ρ with "
                     f"magnitude variance {mv['spearman_do_minus_ta']:+.2f}")
    n = len(mv["points"])
    lines.append(f"- {n} LoRA sets (per seed: hetero, uniform and random per-task mixes of the two).")
    return "\n".join(lines)


def md_sweep(sw: Dict[str, Any]) -> str:
    """Each value with its val score and the paired difference to the default (mean ± std over seeds)."""
    lines = ["| option | value | val normalized acc. (%) | Δ vs default, paired (points) |", "|---|---|---|---|"]
    for name, entries in sw["axes"].items():
        ok = [e for e in entries if "val_norm" in e]
        best = max(ok, key=lambda e: np.mean(e["val_norm"])) if ok else None
        ref = next((e for e in ok if e["is_default"]), None)
        for e in entries:
            if "error" in e:
                lines.append(f"| {name} | {e['value']} | error: {e['error']} | – |")
                continue
            mark = (" **best**" if e is best else "") + (" (default)" if e["is_default"] else "")
            if ref is not None and not e["is_default"]:
                d = np.asarray(e["val_norm"]) - np.asarray(ref["val_norm"])
                delta = f"{100 * d.mean():+.2f} ± {100 * d.std():.2f}"
            else:
                delta = "–"
            lines.append(f"| {name} | {e['value']}{mark} | {fmt(e['val_norm'])} | {delta} |")
    if sw.get("joint"):
        lines.append("")
        lines.append("Joint grid of the two best values of each numeric orthogonalization option (val):")
        lines.append("")
        lines.append("| options | val normalized acc. (%) |")
        lines.append("|---|---|")
        for j in sorted(sw["joint"], key=lambda j: -np.mean(j["val_norm"])):
            lines.append(f"| {json.dumps(j['params'])} | {fmt(j['val_norm'])} |")
    for label in ("defaults", "sweep-best"):
        if label in sw:
            r = sw[label]
            lines.append("")
            lines.append(f"`do` {label} {json.dumps(r['params'])}: val {fmt(r['val_norm'])}, "
                         f"test {fmt(r['test_norm'])}, λ per seed {r['lam']}")
    return "\n".join(lines)


def write_block(path: str, name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (appended if absent)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        pre = text.split(begin)[0]
        post = text.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", nargs="?", default="default", choices=("default", "table", "magvar", "sweep", "all"))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(TR.SEEDS))
    ap.add_argument("--mixes", type=int, default=6, help="random variant mixes per seed (magvar)")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / docs plots")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS.md and the plot from benchmarks/out/quality.json, no merging")
    ap.add_argument("--suite", choices=("all", "digits", "diffusion"),
                    help="both protocols (tuned, drop-in) × T = 2, 3, all for every registry combo "
                         "(see suite.py); rewrites RESULTS.md and the README summary")
    ap.add_argument("--methods", nargs="+", help="--suite: score only these methods, merged with cached results; "
                    "a method with options as one combo: 'do[recombine=v2,orth_gamma=0.5]'")
    ap.add_argument("--plugins", choices=("all", "lean", "none"), default="all",
                    help="--suite: plug-in variants scored per method: +D/+O/+DO (all), +DO (lean), none")
    ap.add_argument("--quick", action="store_true", help="--suite: smoke run (seed 0, T=2, 3 rows); writes nothing")
    ap.add_argument("--protocols", nargs="+", choices=("tuned", "dropin"), default=["tuned", "dropin"],
                    help="--suite: which protocols to (re)score")
    ap.add_argument("--sizes", nargs="+", choices=("T=2", "T=3", "all"), help="--suite: which sizes to (re)score")
    a = ap.parse_args(argv)
    if a.suite:
        import suite
        suite.run_suite(a.suite, [0] if a.quick else a.seeds, a.methods, a.quick, not a.no_write,
                        protocols=a.protocols, sizes=a.sizes, report_only=a.report_only,
                        plugins=a.plugins)
        return
    if a.report_only:
        out = json.load(open(OUT_JSON))
        if "table" in out:
            write_block(RESULTS_MD, "table", md_table(out["table"]))
            write_block(RESULTS_MD, "per-task", md_per_task(out["table"]))
        if "magvar" in out:
            plot_magvar(out["magvar"])
            write_block(RESULTS_MD, "magvar", md_magvar(out["magvar"]))
        if "sweep" in out:
            write_block(RESULTS_MD, "sweep", md_sweep(out["sweep"]))
        return
    t_start = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if not TR.is_cached(a.seeds):
        log("cache missing or stale: training (one-off, ~10 min on one thread)")
        TR.train_all(tuple(a.seeds), log=log)
    benches = [SeedBench(s) for s in a.seeds]
    parts = {"default": ("table", "magvar"), "all": ("table", "magvar", "sweep")}.get(a.part, (a.part,))
    out: Dict[str, Any] = {}
    if os.path.exists(OUT_JSON):
        try:
            out = json.load(open(OUT_JSON))
        except Exception:
            out = {}
    timings = {}
    for part in parts:
        t0 = time.time()
        log(f"== {part}")
        if part == "table":
            extra = []
            best = (out.get("sweep") or {}).get("best_params")
            if best:      # the options the (val-only) sweep preferred, as one more row
                extra.append(MethodCfg("do (sweep-best: " + ", ".join(f"{k}={v}" for k, v in best.items()) + ")",
                                       "do", dict(best)))
            out["table"] = part_table(benches, log, extra)
        elif part == "magvar":
            out["magvar"] = part_magvar(benches, log, a.mixes)
        elif part == "sweep":
            out["sweep"] = part_sweep(benches, log)
        timings[part] = time.time() - t0
        log(f"== {part} done in {timings[part]:.1f}s wall")
    out["timings"] = {**out.get("timings", {}), **timings}
    out["seeds"] = a.seeds
    os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
    with open(OUT_JSON, "w") as f:
        json.dump(out, f, indent=1, default=str)
    if not a.no_write:
        if "table" in parts:
            write_block(RESULTS_MD, "table", md_table(out["table"]))
            write_block(RESULTS_MD, "per-task", md_per_task(out["table"]))
            write_block(RESULTS_MD, "configs", md_configs(benches))
        if "magvar" in parts:
            plot_magvar(out["magvar"])
            write_block(RESULTS_MD, "magvar", md_magvar(out["magvar"]))
        if "sweep" in parts:
            write_block(RESULTS_MD, "sweep", md_sweep(out["sweep"]))
        stamp = (f"seeds {a.seeds}; parts {', '.join(parts)}: " +
                 ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) +
                 f"; total {time.time() - t_start:.0f}s wall, {time.process_time():.0f}s CPU, one thread")
        write_block(RESULTS_MD, f"timing-{'-'.join(parts)}", stamp)
    log(f"total {time.time() - t_start:.1f}s wall, {time.process_time():.1f}s CPU; "
        f"{sum(b.n_evals for b in benches)} evaluations")


if __name__ == "__main__":
    main()
