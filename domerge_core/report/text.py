"""The one text rendering of a merge report and of an analysis: what the CLI prints, the ComfyUI
nodes' report strings, and the rows of the notebook panel's table. Pure: dicts in, text out."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

# per-LoRA columns: (key in report["diagnostics"]["loras"][i], header)
LORA_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("weight", "strength"), ("modules_merged", "modules"), ("update_norm", "‖ΔW‖"),
    ("weighted_update_norm", "‖ΔW‖×|w|"), ("rel_delta_A_mean", "‖δA‖/‖A‖"), ("rel_delta_B_mean", "‖δB‖/‖B‖"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def lora_rows(diag: Dict[str, Any], names: Sequence[str] = ()) -> Tuple[List[str], List[List[Any]]]:
    """(headers, rows): one row per LoRA of ``report["diagnostics"]`` (or of an analysis)."""
    rows = []
    for i, d in enumerate(diag.get("loras") or []):
        name = names[i] if i < len(names) else d.get("name", f"lora{i}")
        rows.append([name] + [d.get(k, float("nan")) for k, _ in LORA_COLUMNS])
    return ["LoRA"] + [h for _, h in LORA_COLUMNS], rows


def merge_scalars(report: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(label, value) of the whole merge: method, modules, output rank, truncation error, cosines
    before / after the orthogonalization, magnitude variance."""
    summ = report.get("summary") or {}
    diag = report.get("diagnostics") or {}
    out: List[Tuple[str, str]] = [("method", str(report.get("method")))]
    if "modules" in summ:
        out.append(("modules", str(summ["modules"])))
    if summ.get("rank_max"):
        lo, hi = summ.get("rank_min", summ["rank_max"]), summ["rank_max"]
        out.append(("output rank", f"{lo}" if lo == hi else f"{lo}..{hi}"))
    if summ.get("rel_error_max"):
        out.append(("truncation error", f"max {summ['rel_error_max']:.3g}, mean {summ.get('rel_error_mean', 0.0):.3g}"
                                        " (relative, per module)"))
    if diag.get("mean_abs_cos_before") is not None:
        cos = f"{diag['mean_abs_cos_before']:.4g}"
        if (report.get("params") or {}).get("orthogonalize") and diag.get("mean_abs_cos_after") is not None:
            cos += f" -> {diag['mean_abs_cos_after']:.4g} after orthogonalization"
        out.append(("mean |cos|", cos))
    if diag.get("magnitude_variance") is not None:
        out.append(("magnitude var.", f"{diag['magnitude_variance']:.4g}"))
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> List[str]:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[j]) for r in cells)) if cells else len(str(h)) for j, h in enumerate(headers)]
    line = lambda r: indent + "  ".join(f"{c:<{w}s}" if j == 0 else f"{c:>{w}s}"   # noqa: E731
                                        for j, (c, w) in enumerate(zip(r, widths)))
    return [line([str(h) for h in headers])] + [line(r) for r in cells]


def render_merge(report: Dict[str, Any], names: Sequence[str] = ()) -> str:
    """A merge report as text: the whole-merge numbers, then one row per LoRA."""
    lines = [f"  {label:<17s} {v}" for label, v in merge_scalars(report)]
    headers, rows = lora_rows(report.get("diagnostics") or {}, names)
    if rows:
        lines += _table(headers, rows)
    return "\n".join(lines)


def _matrix(title: str, names: Sequence[str], mat: Sequence[Sequence[float]]) -> List[str]:
    w = max(8, max((len(n) for n in names), default=8))
    short = [n if len(n) <= w else n[: w - 1] + "…" for n in names]
    out = [title, " " * (w + 3) + "".join(f"{i:>9d}" for i in range(len(names)))]
    for i, (n, row) in enumerate(zip(short, mat)):
        out.append(f"{i:>2d} {n:<{w}s}" + "".join(f"{x:9.4f}" for x in row))
    return out


def render_analysis(analysis: Dict[str, Any], names: Sequence[str] = ()) -> str:
    """`domerge_core.analyze`'s output as text: the cosine matrices before / after the
    orthogonalization, the magnitude variance, the truncation energy and one row per LoRA."""
    names = list(names) or [d.get("name", f"lora{i}") for i, d in enumerate(analysis.get("loras") or [])]
    lines = ["pairwise analysis"]
    for key, when in (("cosine_before", "before"), ("cosine_after", "after")):
        if analysis.get(key) is not None:
            lines += _matrix(f"cos(ΔW_i, ΔW_j) over the shared modules, {when} orthogonalization", names,
                             analysis[key])
    for key, label in (("mean_abs_cos_before", "mean |cos| before"), ("mean_abs_cos_after", "mean |cos| after"),
                       ("magnitude_variance", "magnitude variance"), ("modules_shared", "modules shared")):
        if analysis.get(key) is not None:
            lines.append(f"  {label:<34s} {_fmt(analysis[key])}")
    trunc: Optional[Dict[str, Any]] = analysis.get("truncation")
    if trunc:
        lines.append(f"  {'energy kept at the largest rank':<34s} mean {trunc['energy_kept_at_max_rank_mean']:.4g}, "
                     f"min {trunc['energy_kept_at_max_rank_min']:.4g}")
        lines.append(f"  {'rank for 99 % energy':<34s} mean {trunc['rank_for_99pct_energy_mean']:.3g}, "
                     f"max {trunc['rank_for_99pct_energy_max']}")
    headers, rows = lora_rows(analysis, names)
    if rows:
        lines += _table(headers, rows)
    return "\n".join(lines)
