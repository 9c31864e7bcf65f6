"""HTML tables for the panel: the inputs' summaries and the merge's diagnostics.

Rendering only: every number comes from the core (`describe`, `MergeResult.report`).
"""
from __future__ import annotations

import html
import math
from typing import Any, Dict, Iterable, List, Sequence

_CSS = ("<style>.domerge-t{border-collapse:collapse;font-size:12px;margin:4px 0}"
        ".domerge-t td,.domerge-t th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        ".domerge-t th{background:#f3f3f3}.domerge-t td.l,.domerge-t th.l{text-align:left}</style>")


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 6:
            return html.escape(", ".join(fmt(x) for x in v[:6])) + f", … ({len(v)})"
        return ", ".join(fmt(x) for x in v)
    return html.escape(str(v))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(str(h))}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{fmt(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"{_CSS}<table class='domerge-t'><tr>{head}</tr>{body}</table>"


def summary_line(desc: Dict[str, Any]) -> str:
    """'kohya · sdxl · 722 modules · rank 32 · alpha 16' from a describe() dict."""
    parts: List[str] = []
    for key in ("format", "base_model"):
        if desc.get(key):
            parts.append(str(desc[key]))
    if desc.get("modules") is not None:
        parts.append(f"{desc['modules']} modules")
    for key, label in (("rank", "rank"), ("alpha", "alpha"), ("dtype", "")):
        v = desc.get(key)
        if v is None or v == "" or v == []:
            continue
        parts.append(f"{label} {fmt(v)}".strip())
    return " · ".join(parts)


def report_html(report: Dict[str, Any], names: Sequence[str] = ()) -> str:
    """The diagnostics of a `MergeResult.report` as two tables (one row per LoRA; the whole-merge
    numbers): the rows and labels of the core's text report (`domerge_core.report.text`)."""
    from domerge_core.report.text import lora_rows, merge_scalars
    out = []
    headers, rows = lora_rows(report.get("diagnostics") or {}, names)
    if rows:
        out.append(table(headers, rows))
    out.append(table(["merge", "value"], merge_scalars(report)))
    return "<div style='display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start'>" + \
        "".join(f"<div>{t}</div>" for t in out) + "</div>"
