"""`MergePanel`: tune a LoRA merge by eye in a notebook.

A thin layer over ``domerge_core``: every control maps to an argument of ``domerge_core.merge``
(see `MergePanel.merge_kwargs`), the method list and each method's parameters come from the core
registry, per-LoRA work is cached by the core's ``MergeCache``. This module only adds the UI,
the debounce for live sliders and a worker thread so the notebook stays responsive.

Threading: a merge runs on one worker thread (``background=True``, the default) and reports to
the widgets through the core's progress callback, which is also where Cancel (and a newer live
request superseding a running one) raises ``MergeCancelled``. With ``background=False`` every merge
runs on the caller's thread, which tests use to be deterministic.
"""
from __future__ import annotations

import glob
import html
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import ipywidgets as W

import domerge_core as core
from domerge_core.formats.base_pipeline import as_base

from .debounce import Debouncer
from domerge_core.report.plots import render_pngs
from .tables import report_html, summary_line

_TOP_LEVEL_SWITCHES = ("decouple", "orthogonalize")


def _devices() -> List[str]:
    out = ["auto", "cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            out += [f"cuda:{i}" if torch.cuda.device_count() > 1 else "cuda" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            out.append("mps")
    except Exception:  # pragma: no cover - torch is a hard dependency of the core
        pass
    return out


def _message_html(text: str, kind: str = "info") -> str:
    colors = {"info": ("#1b5e20", "#e8f5e9"), "error": ("#b71c1c", "#ffebee"),
              "warn": ("#8a5a00", "#fff8e1"), "busy": ("#0d47a1", "#e3f2fd")}
    fg, bg = colors.get(kind, colors["info"])
    return (f"<div style='color:{fg};background:{bg};padding:3px 8px;border-radius:3px;"
            f"white-space:pre-wrap;font-size:12px'>{html.escape(text)}</div>")


def _describe(lora) -> Dict[str, Any]:
    """The core's describe() reduced to what a row shows."""
    d = core.describe(lora)
    ranks = d.get("ranks") or {}
    rank = ranks.get("min") if ranks.get("min") == ranks.get("max") else f"{ranks.get('min')}..{ranks.get('max')}"
    alphas = list((d.get("alphas") or {}).keys())
    return {"format": d.get("format"), "base_model": d.get("base_model"), "modules": d.get("modules"),
            "rank": rank, "alpha": alphas[0] if len(alphas) == 1 else (", ".join(alphas[:3]) or None),
            "dtype": d.get("dtype")}


@dataclass
class LoraRow:
    """One input: enable checkbox, name, summary and strength slider."""
    path: str
    lora: Any
    error: Optional[str]
    enabled: W.Checkbox
    name: W.Label
    info: W.HTML
    strength: W.FloatSlider
    box: W.HBox
    blocks: Optional[W.Text] = None      # per-block weights: a preset name or numbers (empty: all 1)

    @property
    def label(self) -> str:
        return os.path.basename(self.path)


class MergePanel:
    """Interactive merge of several LoRA files.

    ``MergePanel(loras=[paths])`` or ``MergePanel(folder="loras/")``; display it as the last
    expression of a cell. Programmatic use mirrors the UI: set widget values, ``merge()`` (or
    ``merge_button.click()``) and ``wait()``; the last result is ``panel.result``.

    ``base``: the base model, for inputs whose update depends on its weights (kohya/LyCORIS DoRA and
    OFT, PEFT DoRA/OFT/BOFT): a diffusers pipeline, a ``{component: module}`` dict, a checkpoint path
    or a ``fn(key, name)``. Without one those inputs show the reader's refusal; :meth:`set_base` (which
    a :class:`PreviewPanel` calls with its pipeline) gives one later and re-reads them.
    """

    def __init__(self, loras: Optional[Sequence[Any]] = None, folder: Optional[str] = None, *,
                 method: Optional[str] = None, weights: Optional[Sequence[float]] = None, device: str = "auto",
                 live: bool = False, debounce: float = 0.35, background: bool = True,
                 output_dir: Optional[str] = None, strength_range: tuple = (-2.0, 2.0), base: Any = None):
        if loras is None and folder is None:
            raise ValueError("give loras=[paths] or folder=...")
        paths: List[Any] = list(loras or [])
        if folder is not None:
            paths += sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        self.background = background
        self.base = base
        self._base_fn = as_base(base)
        self.output_dir = output_dir or folder or os.getcwd()
        self.cache = core.MergeCache()
        self.result = None                      # last successful MergeResult
        self.merges = 0                         # successful merges (tests, benchmarks)
        self.last_error: Optional[str] = None   # message of the last failure, as shown
        self.last_traceback: Optional[str] = None  # for unexpected (non-Domerge) errors only
        self.last_timing: Dict[str, float] = {}
        self.on_progress: List[Callable[[int, int, str], None]] = []   # extra observers (tests)
        self._result_sig = None
        self._lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._wanted: Optional[Dict[str, Any]] = None
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._last_progress_t = 0.0
        self._building = True

        # ---------------- inputs
        self.rows: List[LoraRow] = []
        wlist = list(weights) if weights is not None else []
        for i, p in enumerate(paths):
            w = float(wlist[i]) if i < len(wlist) else 1.0
            self.rows.append(self._make_row(p, w, strength_range))

        # ---------------- method and its parameters
        specs = core.list_methods()
        self._specs = {s.name: s for s in specs}
        options = [(f"{s.label} ({s.name})", s.name) for s in specs]
        method = method or core.default_method()
        if method not in self._specs and specs:
            method = specs[0].name
        self.method = W.Dropdown(options=options, value=method if specs else None, description="method",
                                 layout=W.Layout(width="340px"))
        self.switches = W.HBox([])
        self.param_widgets: Dict[str, W.Widget] = {}
        self.advanced_box = W.VBox([])
        self.advanced = W.Accordion(children=[self.advanced_box])
        self.advanced.set_title(0, "Advanced")
        self.advanced.selected_index = None
        self.method_help = W.HTML()
        self.rank = W.BoundedIntText(value=0, min=0, max=100000, description="out rank",
                                     tooltip="0 = exact (rank Σrᵢ where the method is low rank)",
                                     layout=W.Layout(width="170px"))
        self.energy = W.BoundedFloatText(value=0.0, min=0.0, max=1.0, step=0.01, description="energy",
                                         tooltip="keep this fraction of each module's energy (0 = off)",
                                         layout=W.Layout(width="170px"))
        self.device = W.Dropdown(options=_devices(), value=device if device in _devices() else "auto",
                                 description="device", layout=W.Layout(width="170px"))
        self.live = W.Checkbox(value=live, description="live (re-merge on slider moves)", indent=False)

        # ---------------- actions and state
        self.merge_button = W.Button(description="Merge", button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(width="260px"))
        self.progress_label = W.Label("")
        self.stale = W.HTML("")
        self.status = W.HTML(_message_html("ready", "info"))
        self.table = W.HTML("")
        self.plots = W.Box([], layout=W.Layout(display="flex", flex_flow="row wrap", align_items="flex-start"))
        self.plot_images: Dict[str, W.Image] = {}
        self._png_cache: Dict[str, tuple] = {}
        self.save_name = W.Text(value="merged.safetensors", description="file", layout=W.Layout(width="320px"))
        self.save_format = W.Dropdown(options=[("as first input", "")] + [(f, f) for f in _formats()],
                                      value="", description="layout", layout=W.Layout(width="220px"))
        self.overwrite = W.Checkbox(value=False, description="replace an existing file", indent=False)
        self.save_button = W.Button(description="Save", icon="save")

        self.debouncer = Debouncer(self._live_fire, debounce)
        self._build_params()
        self._wire()
        self._building = False
        self._refresh_stale()
        self.widget = self._layout()

    # ------------------------------------------------------------------ construction
    def _load(self, p: Any):
        """(lora, error, summary) of one input: a Lora as given, or a file read with the panel's base."""
        lora, error, info = (p, None, "") if hasattr(p, "modules") else (None, None, "")
        if lora is None:
            try:
                lora = core.load_lora(p, base=self._base_fn)
            except core.DomergeError as e:
                error = str(e)
            except Exception as e:  # an unexpected reader failure must not kill the panel
                error = f"{p}: {type(e).__name__}: {e}"
        if error is None:
            try:
                info = summary_line(_describe(lora))
            except core.DomergeError as e:
                lora, error = None, str(e)
        return lora, error, info

    def _make_row(self, p: Any, weight: float, rng: tuple) -> LoraRow:
        path = os.fspath(p) if not hasattr(p, "modules") else getattr(p, "source", "<memory>")
        lora, error, info = self._load(p if hasattr(p, "modules") else path)
        enabled = W.Checkbox(value=error is None, disabled=error is not None, indent=False,
                             layout=W.Layout(width="28px"))
        name = W.Label(os.path.basename(path), layout=W.Layout(width="220px"), tooltip=path)
        info_w = W.HTML(_message_html(error, "error") if error else f"<span style='font-size:12px'>{html.escape(info)}</span>",
                        layout=W.Layout(width="420px"))
        strength = W.FloatSlider(value=weight, min=rng[0], max=rng[1], step=0.05, description="",
                                 readout_format=".2f", continuous_update=True, disabled=error is not None,
                                 layout=W.Layout(width="300px"))
        blocks = W.Text(value="", placeholder="block weights", disabled=error is not None,
                        tooltip="Per-block weights: a preset (SD-OUTALL, SDXL-INALL, FLUX-DOUBLE, ...) or "
                                "BASE,IN..,MID,OUT.. numbers; empty: every block at 1",
                        layout=W.Layout(width="160px"))
        return LoraRow(path, lora, error, enabled, name, info_w, strength,
                       W.HBox([enabled, name, strength, blocks, info_w]), blocks)

    def set_base(self, base: Any) -> int:
        """Use ``base`` (see the class doc) from now on and re-read the inputs that failed to load
        (e.g. DoRA/OFT refused for want of a base). Returns how many rows now load."""
        self.base = base
        self._base_fn = as_base(base)
        fixed = 0
        for r in self.rows:
            if r.lora is not None or r.error is None:
                continue
            lora, error, info = self._load(r.path)
            r.error = error
            if error is not None:
                r.info.value = _message_html(error, "error")
                continue
            r.lora = lora
            r.info.value = f"<span style='font-size:12px'>{html.escape(info)}</span>"
            for w in (r.enabled, r.strength, r.blocks):
                if w is not None:
                    w.disabled = False
            r.enabled.value = True
            fixed += 1
        if fixed:
            self._refresh_stale()
        return fixed

    def _spec(self):
        return self._specs[self.method.value]

    def _build_params(self) -> None:
        """Controls for the selected method, generically from ``MethodSpec.all_params()``."""
        old = {k: w for k, w in self.param_widgets.items()}
        for w in old.values():
            w.unobserve(self._on_param_change, names="value")
        self.param_widgets = {}
        switches, advanced = [], []
        spec = self._spec()
        own = {p.name for p in spec.params}
        for p in spec.all_params():
            w = _param_widget(p)
            w.observe(self._on_param_change, names="value")
            self.param_widgets[p.name] = w
            w._domerge_live = p.name in own and p.type in ("float", "int")   # cheap to re-merge
            if p.name in _TOP_LEVEL_SWITCHES and p.type == "bool":
                switches.append(w)
            else:
                advanced.append(w)
        self.switches.children = switches
        self.advanced_box.children = advanced
        self.method_help.value = f"<span style='font-size:12px;color:#555'>{html.escape(spec.description)}</span>"

    def _wire(self) -> None:
        for r in self.rows:
            r.enabled.observe(self._on_strength_change, names="value")
            r.strength.observe(self._on_strength_change, names="value")
            if r.blocks is not None:
                r.blocks.observe(self._on_strength_change, names="value")
        self.method.observe(self._on_method_change, names="value")
        for w in (self.rank, self.energy, self.device):
            w.observe(self._on_other_change, names="value")
        self.live.observe(self._on_other_change, names="value")
        self.merge_button.on_click(lambda _b: self.merge())
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.save_button.on_click(lambda _b: self.save())

    def _layout(self) -> W.VBox:
        header = W.HTML("<b>DO-Merge</b> <span style='color:#666;font-size:12px'>"
                        f"{len(self.rows)} LoRA file(s)</span>")
        rows = [r.box for r in self.rows] or [W.HTML(_message_html("no LoRA files found", "warn"))]
        method_row = W.HBox([self.method, self.switches])
        out_row = W.HBox([self.rank, self.energy, self.device, self.live])
        actions = W.HBox([self.merge_button, self.cancel_button, self.progress, self.progress_label, self.stale])
        save_row = W.HBox([self.save_name, self.save_format, self.overwrite, self.save_button])
        box = W.VBox([header, W.VBox(rows), method_row, self.method_help, self.advanced, out_row, actions,
                      self.status, self.table, self.plots, save_row])
        box.add_class("domerge-panel")
        return box

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)

    # ------------------------------------------------------------------ what the controls say
    def enabled_rows(self) -> List[LoraRow]:
        return [r for r in self.rows if r.lora is not None and r.enabled.value]

    def params(self) -> Dict[str, Any]:
        return {k: w.value for k, w in self.param_widgets.items()}

    def merge_kwargs(self) -> Dict[str, Any]:
        """The exact arguments this panel passes to ``domerge_core.merge`` (besides progress/cache)."""
        rows = self.enabled_rows()
        kw = dict(inputs=[r.lora for r in rows], method=self.method.value, params=self.params(),
                  weights=[float(r.strength.value) for r in rows],
                  rank=int(self.rank.value) or None, energy=float(self.energy.value) or None,
                  device=self.device.value)
        specs = [(r.blocks.value.strip() or None) if r.blocks is not None else None for r in rows]
        if any(specs):
            from domerge_core.blocks import weights_and_multipliers
            kw["weights"], mults = weights_and_multipliers(kw["weights"], [None] * len(rows), specs,
                                                           [r.lora.base_model for r in rows])
            if mults is not None:
                kw["multipliers"] = mults
        return kw

    def _signature(self, kw: Optional[Dict[str, Any]] = None):
        kw = kw or self.merge_kwargs()
        return (tuple(id(x) for x in kw["inputs"]), kw["method"], tuple(sorted(kw["params"].items())),
                tuple(kw["weights"]), kw["rank"], kw["energy"], kw["device"],
                tuple(getattr(m, "spec", None) for m in kw.get("multipliers") or ()))

    @property
    def is_stale(self) -> bool:
        """True when the shown result no longer matches the controls (or there is none)."""
        try:
            return self._result_sig is None or self._result_sig != self._signature()
        except core.DomergeError:        # e.g. a block-weight vector being typed
            return True

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    # ------------------------------------------------------------------ events
    def _on_strength_change(self, _change=None) -> None:
        self._changed(live=True)

    def _on_param_change(self, change) -> None:
        self._changed(live=getattr(change["owner"], "_domerge_live", False))

    def _on_other_change(self, _change=None) -> None:
        self._changed(live=False)

    def _on_method_change(self, _change=None) -> None:
        self._build_params()
        self._changed(live=False)

    def _changed(self, live: bool) -> None:
        if self._building:
            return
        self._refresh_stale()
        if live and self.live.value:
            self.debouncer.trigger()

    def _live_fire(self) -> None:
        if self.is_stale:
            self.merge()

    def _refresh_stale(self) -> None:
        if self.result is None:
            self.stale.value = "<span style='color:#888;font-size:12px'>no result yet</span>"
        elif self.is_stale:
            self.stale.value = ("<span style='color:#8a5a00;font-weight:bold;font-size:12px'>"
                                "⚠ stale: controls changed since the last merge</span>")
        else:
            self.stale.value = "<span style='color:#1b5e20;font-size:12px'>✓ up to date</span>"

    # ------------------------------------------------------------------ merging
    def merge(self) -> None:
        """Merge with the current controls (on the worker thread unless ``background=False``).
        A request made while a merge runs supersedes it: the running one is cancelled."""
        self.debouncer.cancel()
        try:
            kw = self.merge_kwargs()
        except core.DomergeError as e:
            self._fail(str(e))
            return
        if not kw["inputs"]:
            self._fail("no LoRA enabled: tick at least one")
            return
        if not self.background:
            self._idle.clear()
            try:
                self._run(kw)
            finally:
                self._idle.set()
            return
        with self._lock:
            self._wanted = kw
            self._idle.clear()
            if self._worker is None:
                self._worker = threading.Thread(target=self._worker_loop, name="domerge-merge", daemon=True)
                self._worker.start()

    def _worker_loop(self) -> None:
        while True:
            with self._lock:
                kw, self._wanted = self._wanted, None
                if kw is None:
                    self._worker = None
                    self._idle.set()
                    return
            try:
                self._run(kw)
            except Exception:  # _run reports everything; never let the worker die silently
                self.last_traceback = traceback.format_exc()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until no merge is running or queued. Returns False on timeout."""
        return self._idle.wait(timeout)

    def cancel(self) -> None:
        """Stop the running merge (at its next progress report) and drop a queued one."""
        self.debouncer.cancel()
        with self._lock:
            self._wanted = None
        if self._running.is_set():
            self._cancel.set()
            self.status.value = _message_html("cancelling…", "warn")

    def _progress(self, done: int, total: int, stage: str) -> None:
        for fn in list(self.on_progress):
            fn(done, total, stage)
        if self._cancel.is_set():
            raise core.MergeCancelled("merge cancelled")
        if self._wanted is not None:     # a newer live request: stop this one, the worker runs it next
            raise core.MergeCancelled("superseded by a newer request")
        now = time.monotonic()
        if now - self._last_progress_t > 0.05 or done >= total:
            self._last_progress_t = now
            self.progress.max = max(int(total), 1)
            self.progress.value = min(int(done), self.progress.max)
            self.progress_label.value = f"{stage} {done}/{total}"

    def _run(self, kw: Dict[str, Any]) -> None:
        self._cancel.clear()
        self._running.set()
        self.merge_button.disabled = True
        self.cancel_button.disabled = False
        self.progress.value = 0
        self.progress_label.value = ""
        self.status.value = _message_html("merging…", "busy")
        t0 = time.perf_counter()
        try:
            res = core.merge(**kw, progress=self._progress, cache=self.cache)
        except core.MergeCancelled as e:
            superseded = "superseded" in str(e)
            self.status.value = _message_html("superseded by a newer request" if superseded
                                              else "merge cancelled; the previous result is kept", "warn")
            if not superseded:
                self.last_error = str(e)
            self._refresh_stale()
            return
        except core.DomergeError as e:
            self._fail(str(e))
            return
        except Exception as e:  # not a deliberate core error: still a message, never a traceback
            self.last_traceback = traceback.format_exc()
            self._fail(f"unexpected error: {type(e).__name__}: {e}")
            return
        finally:
            self._running.clear()
            self.merge_button.disabled = False
            self.cancel_button.disabled = True
        t1 = time.perf_counter()
        self.result = res
        self._result_sig = self._signature(kw)
        self._result_names = [self._name_of(x) for x in kw["inputs"]]
        self.merges += 1
        self.last_error = None
        self.progress.value = self.progress.max
        n_mod = len(res.lora) if res.lora is not None else 0
        done = (f"merged {len(kw['inputs'])} LoRA(s) with {res.method}: {n_mod} modules "
                f"in {t1 - t0:.2f} s")
        # numbers first, then the plots (matplotlib is the slow part of showing a result)
        self.table.value = report_html(res.report or {}, self._result_names)
        self.status.value = _message_html(done + " (drawing plots…)", "info")
        self._refresh_stale()
        if self._wanted is None:        # skip drawing if a newer live request is already waiting
            self._draw_plots(res)
        t2 = time.perf_counter()
        self.last_timing = {"merge_s": t1 - t0, "render_s": t2 - t1}
        self.status.value = _message_html(done + f" (+{t2 - t1:.2f} s diagnostics and plots)", "info")

    def _name_of(self, lora) -> str:
        for r in self.rows:
            if r.lora is lora:
                return r.label
        return os.path.basename(getattr(lora, "source", "?"))

    def _fail(self, msg: str) -> None:
        self.last_error = msg
        self.status.value = _message_html(msg, "error")
        self._refresh_stale()

    def _draw_plots(self, res) -> None:
        pngs = render_pngs(res.report or {}, self._result_names, self._png_cache)
        images = {}
        for key, png in pngs.items():
            img = self.plot_images.get(key)
            if img is None:
                img = W.Image(format="png", layout=W.Layout(margin="2px"))
            if img.value != png:
                img.value = png
                img.width = str(_png_width(png))       # natural size: no blurry up-scaling
            images[key] = img
        self.plot_images = images
        if list(self.plots.children) != list(images.values()):
            self.plots.children = list(images.values())

    # ------------------------------------------------------------------ saving
    def save(self, name: Optional[str] = None) -> Optional[str]:
        """Write the last result (atomic; an existing file is refused unless 'replace' is ticked).
        Returns the path written, or None (the reason is shown in the panel)."""
        if self.result is None:
            self._fail("nothing to save: merge first")
            return None
        name = (name or self.save_name.value or "").strip()
        if not name:
            self._fail("give a file name to save to")
            return None
        path = name if os.path.isabs(name) else os.path.join(self.output_dir, name)
        try:
            # a layout the stock loaders would skip (peft for an SD/SDXL/Flux LoRA) is refused
            fmt = core.check_loadable(self.result.lora, self.save_format.value or None)
            written = self.result.save(path, format=fmt, overwrite=bool(self.overwrite.value))
        except core.DomergeError as e:
            self._fail(str(e))
            return None
        except OSError as e:
            self._fail(f"{path}: {e.strerror or e}")
            return None
        note = " (note: controls changed since this merge)" if self.is_stale else ""
        self.last_error = None
        self.status.value = _message_html(f"saved {written}{note}", "info")
        return written


def _png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")     # IHDR width


def _formats() -> List[str]:
    try:
        return list(core.FORMATS)
    except (AttributeError, ImportError):
        return ["kohya", "diffusers", "peft"]


def _param_widget(p) -> W.Widget:
    """One ipywidget for a registry `Param` (type, range, step, choices, help)."""
    label = p.label or p.name
    common = dict(description=label, tooltip=p.help or label, style={"description_width": "initial"})
    has_range = p.min is not None and p.max is not None
    if p.type == "bool":
        return W.Checkbox(value=bool(p.default), indent=False, **common)
    if p.type == "choice":
        return W.Dropdown(options=list(p.choices), value=p.default, **common)
    if p.type == "int":
        if has_range:
            return W.IntSlider(value=int(p.default), min=int(p.min), max=int(p.max), step=int(p.step or 1),
                               continuous_update=True, **common)
        return W.IntText(value=int(p.default), **common)
    if p.type == "float":
        if has_range:
            step = float(p.step) if p.step else (float(p.max) - float(p.min)) / 100.0
            return W.FloatSlider(value=float(p.default), min=float(p.min), max=float(p.max), step=step,
                                 readout_format=".3g", continuous_update=True, **common)
        return W.FloatText(value=float(p.default), step=float(p.step) if p.step else None, **common)
    return W.Text(value=str(p.default), **common)
