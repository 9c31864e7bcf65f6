"""Matplotlib figures of a merge's diagnostics (``MergeResult.report``), shared by every adapter:
the notebook panel shows them as PNGs, the ComfyUI report node as one IMAGE.

Needs matplotlib (the ``notebook`` extra; ComfyUI ships it); nothing else in the core imports
this module. Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through
pyplot: thread-safe (the panel merges on a worker thread) and free of any notebook backend.
"""
from __future__ import annotations

import io
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


MAX_TICK_LABELS = 24      # text is most of a figure's drawing time: label every k-th block only


def new_figure(width: float = 6.4, height: float = 3.2) -> Figure:
    # no constrained layout: it doubles the drawing time, and live sliders redraw often
    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def block_norms_figure(names: Sequence[str], blocks: Sequence[str], norms: Sequence[Sequence[float]],
                       title: str = "Update norm per block (‖ΔWᵢ‖_F, strength applied)") -> Figure:
    """One line per LoRA over the blocks: the magnitude distribution DO-Merging is about.

    ``norms[i][b]`` is LoRA i's update norm in block b (NaN where it has no module there).
    """
    fig = new_figure(7.5, 3.4)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.3)
    ax = fig.add_subplot()
    x = np.arange(len(blocks))
    for name, row in zip(names, norms):
        ax.plot(x, np.asarray(row, dtype=float), marker="o", ms=3, lw=1.2, label=_short(name))
    every = max(1, -(-len(blocks) // MAX_TICK_LABELS))
    ax.set_xticks(x[::every], [_short(b, 18) for b in blocks][::every], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("norm")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(names) > 0:
        ax.legend(fontsize=7)
    return fig


def cosine_figure(names: Sequence[str], before, after=None) -> Figure:
    """Pairwise cosine heatmap(s) of the LoRAs' updates, before and (if given) after orthogonalizing."""
    mats = [("before orthogonalization" if after is not None else "pairwise cos(ΔWᵢ, ΔWⱼ)", before)]
    if after is not None:
        mats.append(("after orthogonalization", after))
    labels = [_short(n, 24) for n in names]
    # room for the y tick labels left of each heatmap (7 pt text, ~0.6 em per character)
    label_in = max((len(x) for x in labels), default=1) * 7 * 0.6 / 72 + 0.2
    width = (2.6 + label_in) * len(mats) + 0.9
    fig = new_figure(width, 3.3)
    fig.subplots_adjust(left=label_in / width, right=1 - 0.9 / width, top=0.9,
                        bottom=min(0.45, (label_in * 0.75 + 0.15) / 3.3), wspace=label_in / 2.6 + 0.15)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    im = None
    for ax, (title, m) in zip(axes, mats):
        m = np.asarray(m, dtype=float)
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8)
    return fig


def truncation_figure(modules: Sequence[str], values: Sequence[float], ylabel: str = "energy kept",
                      title: str = "Truncation per module") -> Figure:
    """Per-module truncation quality (energy kept, or relative error), modules sorted worst first."""
    v = np.asarray(values, dtype=float)
    worst_first = np.argsort(v) if "kept" in ylabel else np.argsort(-v)
    fig = new_figure(6.4, 3.0)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.88, bottom=0.17)
    ax = fig.add_subplot()
    ax.plot(np.arange(len(v)), v[worst_first], lw=1.2)
    ax.set_xlabel(f"module (sorted, {len(v)} in all)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(v):
        k = int(worst_first[0])
        ax.annotate(_short(modules[k], 40), (0, v[k]), fontsize=7, xytext=(8, 8), textcoords="offset points")
    return fig


_BLOCK_WORDS = (("text_encoder_2.text_model.encoder.layers.", "te2.L"), ("text_encoder.text_model.encoder.layers.", "te.L"),
                ("text_encoder_3.", "te3."), ("text_encoder_2.", "te2."), ("text_encoder.", "te."), ("unet.", ""),
                ("transformer.", ""), ("_blocks.", "."), ("_block.", "."), ("attentions.", "attn."),
                ("resnets.", "res."))


_COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoders", "prior", "unet",
                    "transformer", "diffusion_model")
_STAGE_ORDER = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "input_blocks", "mid_block",
                "middle_block", "up_blocks", "output_blocks", "conv_norm_out", "conv_out", "x_embedder",
                "img_in", "context_embedder", "txt_in", "time_text_embed", "time_in", "vector_in",
                "transformer_blocks", "double_blocks", "single_transformer_blocks", "single_blocks",
                "norm_out", "final_layer", "proj_out")
_SUB_ORDER = {"resnets": 0, "attentions": 1, "downsamplers": 2, "upsamplers": 2}


def block_order_key(block: str):
    """Sort key putting blocks in model order: text encoders, then the UNet (down, mid, up) or the
    DiT (double, single), numbers numerically (te.L2 before te.L11), resnet before attention."""
    comp, _, rest = str(block).partition(".")
    c = _COMPONENT_ORDER.index(comp) if comp in _COMPONENT_ORDER else len(_COMPONENT_ORDER)
    parts = [p for p in re.split(r"\.", rest) if p]
    stage = parts[0] if parts else ""
    st = _STAGE_ORDER.index(stage) if stage in _STAGE_ORDER else len(_STAGE_ORDER)
    nat = []
    i = 1
    while i < len(parts):
        p = parts[i]
        if p in _SUB_ORDER and i + 1 < len(parts) and parts[i + 1].isdigit():
            nat.append((0, int(parts[i + 1]), _SUB_ORDER[p], ""))      # resnets.0, attentions.0, resnets.1
            i += 2
            continue
        nat.append((0, int(p), 0, "") if p.isdigit() else (1, 0, 0, p))
        i += 1
    return (c, comp, st, stage, tuple(nat))


def block_label(block: str) -> str:
    """A short tick label for a block name from the core ("unet.down_blocks.1" -> "down.1",
    "text_encoder_2.text_model.encoder.layers.7" -> "te2.L7")."""
    for a, b in _BLOCK_WORDS:
        block = block.replace(a, b)
    return block


def _short(s: str, n: int = 28) -> str:
    s = str(s)
    if s.endswith(".safetensors"):
        s = s[: -len(".safetensors")]
    return s if len(s) <= n else "…" + s[-(n - 1):]


# --------------------------------------------------------------------------------------------
# From the core's report (``MergeResult.report``, see domerge_core/report/diagnostics.py) to figures
# --------------------------------------------------------------------------------------------
def plot_data(report: Dict, names: Optional[Sequence[str]] = None) -> List[tuple]:
    """[(key, builder, kwargs)] for what the report holds; missing parts are skipped, not guessed.

    - ``block_norms``: ``diagnostics.blocks[b].update_norms`` (‖ΔWᵢ‖_F at strength 1, over the
      every module each LoRA has) times |strengthᵢ|;
    - ``cosine``: ``diagnostics.cosine_before`` / ``cosine_after`` (after only when orthogonalizing);
    - ``truncation``: per-module ``rel_error`` from ``modules`` when a rank or energy was set,
      shown as the energy kept, 1 − rel_error².
    """
    diag = report.get("diagnostics") or {}
    names = list(names or report.get("inputs") or [])
    weights = list(report.get("weights") or [1.0] * len(names))
    out: List[tuple] = []
    blocks = diag.get("blocks") or {}
    if blocks and names:
        bnames = sorted(blocks, key=block_order_key)
        norms = [[abs(weights[i]) * float(blocks[b]["update_norms"][i]) for b in bnames] for i in range(len(names))]
        out.append(("block_norms", block_norms_figure,
                    dict(names=names, blocks=[block_label(b) for b in bnames], norms=norms,
                         title="Update norm per block, ‖ΔWᵢ‖_F × |strengthᵢ|")))
    if diag.get("cosine_before") is not None and len(names) >= 2:
        after = diag.get("cosine_after") if (report.get("params") or {}).get("orthogonalize") else None
        out.append(("cosine", cosine_figure, dict(names=names, before=diag["cosine_before"], after=after)))
    mods = report.get("modules") or {}
    if (report.get("rank") is not None or report.get("energy") is not None) and mods:
        keys = list(mods)
        kept = [1.0 - float(mods[k].get("rel_error", 0.0)) ** 2 for k in keys]
        target = f"rank {report['rank']}" if report.get("rank") is not None else f"energy {report['energy']}"
        out.append(("truncation", truncation_figure,
                    dict(modules=keys, values=kept, ylabel="energy kept", title=f"Energy kept per module at {target}")))
    return out


def figures_from_report(report: Dict, names: Optional[Sequence[str]] = None) -> List[tuple]:
    """[(key, Figure)] for what the report holds (see `plot_data`)."""
    return [(key, build(**kw)) for key, build, kw in plot_data(report, names)]


def render_pngs(report: Dict, names: Optional[Sequence[str]] = None,
                cache: Optional[Dict[str, tuple]] = None) -> Dict[str, bytes]:
    """{key: PNG} for the report's plots. With ``cache`` (a dict kept by the caller), a plot whose
    data did not change since the last call is not drawn again: a strength move redraws the norm
    plot but not the cosine heatmaps (drawing text is most of matplotlib's time)."""
    out: Dict[str, bytes] = {}
    for key, build, kw in plot_data(report, names):
        fp = repr(sorted((k, np.round(np.asarray(v, dtype=float), 6).tobytes() if _numeric(v) else repr(v))
                         for k, v in kw.items()))
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] == fp:
            out[key] = hit[1]
            continue
        png = figure_png(build(**kw))
        if cache is not None:
            cache[key] = (fp, png)
        out[key] = png
    return out


def report_image(report: Dict, names: Optional[Sequence[str]] = None) -> np.ndarray:
    """The report's figures side by side as one H×W×3 float array in [0, 1] (white padding)."""
    arrays = []
    for _, fig in figures_from_report(report, names):
        fig.canvas.draw()
        arrays.append(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    if not arrays:
        return np.ones((64, 64, 3), dtype=np.float32)
    h = max(a.shape[0] for a in arrays)
    padded = [np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255) for a in arrays]
    return np.concatenate(padded, axis=1).astype(np.float32) / 255.0


def _numeric(v) -> bool:
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        return False
    return a.size > 0
