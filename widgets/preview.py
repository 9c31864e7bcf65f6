"""`PreviewPanel`: see what a merge does to the pictures, with a fixed seed and prompt.

Renders one row of tiles: the base pipeline, each enabled LoRA alone at its strength, plain
stacking (all of them as separate adapters at their strengths, what chaining LoRA loaders does),
and the merged result from the `MergePanel`. Nothing is written to disk: inputs are loaded as
state dicts, the merge through ``MergeResult.state_dict()``, each as a named adapter
(``pipe.load_lora_weights(state_dict, adapter_name=...)``; inputs through ``to_state_dict``). Afterwards every adapter is unloaded
so the pipeline is left exactly as it was; a pipeline that already holds LoRA adapters is refused
(restoring someone else's adapter weights exactly is not possible through the public API).

Works with any diffusers pipeline that has ``load_lora_weights`` and accepts ``prompt``,
``num_inference_steps``, ``generator`` and ``output_type="np"``; extra call arguments go in
``pipe_kwargs``.

A panel without a ``base`` gets this pipeline as its base (``MergePanel.set_base``): inputs refused for
want of one (DoRA, OFT, PEFT DoRA/OFT/BOFT) are read against the pipeline's weights.
"""
from __future__ import annotations

import threading
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional

import ipywidgets as W
import numpy as np

import domerge_core as core

from .panel import _message_html

ADAPTER_PREFIX = "domerge_preview_"


class PreviewPanel:
    def __init__(self, pipe, panel, *, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 20,
                 size: Optional[int] = None, pipe_kwargs: Optional[Dict[str, Any]] = None,
                 background: bool = True, tile_px: int = 192, layout: str = "diffusers"):
        if not hasattr(pipe, "load_lora_weights"):
            raise TypeError(f"{type(pipe).__name__} does not take LoRAs (no load_lora_weights)")
        self.pipe = pipe
        self.panel = panel
        if getattr(panel, "base", None) is None and hasattr(panel, "set_base"):
            panel.set_base(pipe)      # the previewed model is the base DoRA/OFT inputs are read against
        self.background = background
        self.pipe_kwargs = dict(pipe_kwargs or {})
        self.size = size
        self.tile_px = tile_px
        self.layout = layout
        self.images: Dict[str, np.ndarray] = {}      # caption -> float image (H, W, 3) in [0, 1]
        self.last_error: Optional[str] = None
        self.last_traceback: Optional[str] = None
        self._idle = threading.Event()
        self._idle.set()

        self.prompt = W.Text(value=prompt, description="prompt", layout=W.Layout(width="420px"))
        self.seed = W.IntText(value=seed, description="seed", layout=W.Layout(width="160px"))
        self.steps = W.BoundedIntText(value=steps, min=1, max=1000, description="steps", layout=W.Layout(width="160px"))
        self.render_button = W.Button(description="Render preview", icon="image", button_style="info")
        self.status = W.HTML(_message_html("press Render preview after a merge", "info"))
        self.grid = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.render_button.on_click(lambda _b: self.render())
        self.widget = W.VBox([W.HTML("<b>Preview</b>"), W.HBox([self.prompt, self.seed, self.steps, self.render_button]),
                              self.status, self.grid])

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)

    # ------------------------------------------------------------------ public
    def render(self) -> None:
        if not self._idle.is_set():
            self.status.value = _message_html("a preview is already rendering", "warn")
            return
        self._idle.clear()
        if self.background:
            threading.Thread(target=self._render_guarded, name="domerge-preview", daemon=True).start()
        else:
            self._render_guarded()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._idle.wait(timeout)

    def generate(self) -> np.ndarray:
        """One image with the pipeline as it is now (fixed seed and prompt)."""
        import torch

        g = torch.Generator("cpu").manual_seed(int(self.seed.value))
        kw = dict(prompt=self.prompt.value, num_inference_steps=int(self.steps.value), generator=g,
                  output_type="np")
        if self.size:
            kw.update(height=self.size, width=self.size)
        kw.update(self.pipe_kwargs)
        img = self.pipe(**kw).images[0]
        return np.asarray(img, dtype=np.float32)

    # ------------------------------------------------------------------ work
    def _render_guarded(self) -> None:
        try:
            self._render()
        except core.DomergeError as e:
            self._fail(str(e))
        except Exception as e:  # diffusers/peft failures: a message, never a traceback
            self.last_traceback = traceback.format_exc()
            self._fail(f"preview failed: {type(e).__name__}: {e}")
        finally:
            self._idle.set()

    def _fail(self, msg: str) -> None:
        self.last_error = msg
        self.status.value = _message_html(msg, "error")

    def _render(self) -> None:
        panel = self.panel
        if panel.result is None:
            raise core.DomergeError("nothing to preview yet: merge first")
        existing = _adapter_names(self.pipe)
        if existing:
            raise core.DomergeError(
                f"the pipeline already holds LoRA adapters ({', '.join(existing)}); the preview would not "
                "leave it as it was. Unload them first (pipe.unload_lora_weights()).")
        res = panel.result
        stale = " (stale)" if panel.is_stale else ""
        names = [_name(x, panel) for x in res.inputs]
        weights = [float(w) for w in res.weights]
        t0 = time.perf_counter()
        self.last_error = None
        images: Dict[str, np.ndarray] = {}
        self.status.value = _message_html("rendering base…", "busy")
        images["base"] = self.generate()
        adapters: List[str] = []
        try:
            for i, lora in enumerate(res.inputs):
                a = f"{ADAPTER_PREFIX}{i}"
                self.status.value = _message_html(f"loading {names[i]}…", "busy")
                _load(self.pipe, _state_dict(lora, self.layout), a)
                adapters.append(a)
            _load(self.pipe, _state_dict(res, self.layout), ADAPTER_PREFIX + "merged")
            adapters.append(ADAPTER_PREFIX + "merged")
            for i, (n, w) in enumerate(zip(names, weights)):
                self.status.value = _message_html(f"rendering {n} alone…", "busy")
                self.pipe.set_adapters([adapters[i]], adapter_weights=[w])
                images[f"{n} alone ×{w:g}"] = self.generate()
            self.status.value = _message_html("rendering plain stacking…", "busy")
            self.pipe.set_adapters(adapters[:-1], adapter_weights=weights)
            images["stacked (" + " + ".join(f"{w:g}" for w in weights) + ")"] = self.generate()
            self.status.value = _message_html("rendering merged…", "busy")
            self.pipe.set_adapters([adapters[-1]], adapter_weights=[1.0])
            images[f"merged: {res.method}{stale}"] = self.generate()
        finally:
            if adapters:
                self.pipe.unload_lora_weights()
        self.images = images
        self.grid.value = _grid_png(images, self.tile_px)
        self.status.value = _message_html(f"{len(images)} images in {time.perf_counter() - t0:.1f} s "
                                          f"(seed {self.seed.value}, {self.steps.value} steps)", "info")


def _load(pipe, state_dict: Dict[str, Any], name: str) -> None:
    with warnings.catch_warnings():   # peft warns on every adapter after the first: expected here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(state_dict, adapter_name=name)


def _adapter_names(pipe) -> List[str]:
    try:
        listed = pipe.get_list_adapters()     # {component: [names]}
    except Exception:
        return []
    names: List[str] = []
    for v in (listed or {}).values():
        names += [n for n in v if n not in names]
    return names


def _name(lora, panel) -> str:
    for r in panel.rows:
        if r.lora is lora:
            return r.label.rsplit(".", 1)[0]
    return str(getattr(lora, "name", "lora")).rsplit(".", 1)[0]


def _state_dict(lora_or_result, layout: str) -> Dict[str, Any]:
    """A LoRA (or merge result) as the core writes it in ``layout``.

    Not the raw files, and "diffusers" layout by default (lora_A/lora_B, scale baked in, no alpha):
    diffusers 0.42 silently applies a kohya file's most common alpha to every attention module, so
    a kohya state dict whose modules differ in alpha (inputs with per-module alphas, or a merge
    whose modules differ in rank) would be previewed at the wrong scale."""
    if hasattr(lora_or_result, "state_dict"):
        sd, _meta = lora_or_result.state_dict(format=layout)
    else:
        sd, _meta = core.to_state_dict(lora_or_result, layout)
    return dict(sd)


def _grid_png(images: Dict[str, np.ndarray], tile_px: int) -> bytes:
    """One row of captioned tiles."""
    import io

    from PIL import Image, ImageDraw

    cap_h = 30
    tiles = []
    for caption, img in images.items():
        arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        im = Image.fromarray(arr).resize((tile_px, tile_px), Image.NEAREST)
        tile = Image.new("RGB", (tile_px, tile_px + cap_h), "white")
        tile.paste(im, (0, 0))
        d = ImageDraw.Draw(tile)
        lines = _wrap(caption, max(8, tile_px // 7))
        for k, line in enumerate(lines[:2]):
            d.text((4, tile_px + 2 + 13 * k), line, fill="black")
        tiles.append(tile)
    gap = 6
    grid = Image.new("RGB", (len(tiles) * (tile_px + gap) - gap, tile_px + cap_h), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, (i * (tile_px + gap), 0))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def _wrap(text: str, width: int) -> List[str]:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        out.append(line)
    return out
