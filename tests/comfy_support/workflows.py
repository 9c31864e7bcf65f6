"""The example workflows (``example_workflows/*.json``, ComfyUI's UI format), generated in Python.

Every widget value of this pack's nodes comes from the node definitions as they are now — which take
the merge methods' parameters and defaults from the core's registry — so the examples cannot drift
from the defaults (tests/test_comfy_nodes.py compares the committed files with `build`):

    .venv/bin/python tests/comfy_support/workflows.py          # rewrite example_workflows/*.json

Stock ComfyUI nodes are described here by hand (sockets and widget values); the front end lays the
graph out from the positions below (tests/comfy_support/screenshot.py loads the result in ComfyUI's
page for the README picture).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
VARIANTS = {
    "domerge_sd15.json": {"ckpt": "v1-5-pruned-emaonly-fp16.safetensors", "size": 512},
    "domerge_sdxl.json": {"ckpt": "sd_xl_base_1.0.safetensors", "size": 1024},
}
LORAS = (("style_watercolor.safetensors", 0.8), ("character_fox.safetensors", 1.0))
METHOD = "do"

# stock nodes: (inputs [(name, type)], outputs [(name, type)])
STOCK = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
}


def is_widget(decl) -> bool:
    return isinstance(decl[0], list) or decl[0] in WIDGET_KINDS


def sockets_and_widgets(input_types: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], List[Tuple[str, Any]]]:
    """([(socket name, type)], [(widget name, default)]) in the order the front end creates them."""
    sockets, widgets = [], []
    for sec in ("required", "optional"):
        for name, decl in input_types.get(sec, {}).items():
            if is_widget(decl):
                opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
                default = opts.get("default", decl[0][0] if isinstance(decl[0], list) and decl[0] else None)
                widgets.append((name, default))
            else:
                sockets.append((name, decl[0]))
    return sockets, widgets


def node_defs() -> Dict[str, Dict[str, Any]]:
    """{node id: {"input": INPUT_TYPES, "outputs": [(name, type)]}} of this pack's nodes. The LoRA
    list's file choice is left out (it lists the user's loras folder; the examples name theirs)."""
    try:
        import domerge_nodes as pack     # the pip-installed package (the repo's nodes/)
    except ImportError:                  # a bare checkout: the pack folder itself
        sys.path.insert(0, str(REPO.parent))
        pack = __import__(REPO.name).nodes

    out = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        if node_id == "DomergeLoraList":
            it = {"required": {"lora_name": (["None"], {}), "strength": ("FLOAT", {"default": 1.0})},
                  "optional": {"loras": ("DOMERGE_LORA_LIST", {}), "lora_stack": ("LORA_STACK", {}),
                               "strength_clip": ("FLOAT", {"default": 1.0}),
                               "use_strength_clip": ("BOOLEAN", {"default": False}),
                               "block_weights": ("STRING", {"default": ""})}}
        else:
            it = cls.INPUT_TYPES()
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        out[node_id] = {"input": it, "outputs": list(zip(names, cls.RETURN_TYPES))}
    return out


class _Graph:
    def __init__(self, defs):
        self.defs, self.nodes, self.links = defs, [], []

    def add(self, node_type: str, col: int, widgets: Optional[Dict[str, Any]] = None, values=None, **links):
        """A node; ``widgets`` override the definition's defaults by name (pack nodes), ``values`` is
        the full widget list (stock nodes); keyword ``name=(node, slot)`` links an input."""
        if node_type in self.defs:
            sockets, wdefs = sockets_and_widgets(self.defs[node_type]["input"])
            outputs = self.defs[node_type]["outputs"]
            unknown = set(widgets or {}) - {n for n, _ in wdefs}
            assert not unknown, (node_type, unknown)
            values = [(widgets or {}).get(n, d) for n, d in wdefs]
        else:
            sockets, outputs = STOCK[node_type]
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": node_type, "pos": [0, 0], "size": [320, 60 + 26 * (len(values or [])
                                                                                      + max(len(sockets), len(outputs)))],
                "flags": {}, "order": nid - 1, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
                "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
                "properties": {"Node name for S&R": node_type}, "_col": col}
        if values is not None:
            node["widgets_values"] = values
        self.nodes.append(node)
        for name, (src, slot) in links.items():
            lid = len(self.links) + 1
            tslot = next(i for i, s in enumerate(node["inputs"]) if s["name"] == name)
            stype = src["outputs"][slot]["type"]
            self.links.append([lid, src["id"], slot, nid, tslot, stype])
            node["inputs"][tslot]["link"] = lid
            src["outputs"][slot]["links"].append(lid)
        return node

    def layout(self):
        x = 20
        for col in sorted({n["_col"] for n in self.nodes}):
            y, w = 40, 0
            for n in (n for n in self.nodes if n["_col"] == col):
                n["pos"] = [x, y]
                y += n["size"][1] + 50
                w = max(w, n["size"][0])
            x += w + 50
        for n in self.nodes:
            del n["_col"]


def build(name: str, defs: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The UI-format workflow ``name`` (a key of VARIANTS)."""
    v = VARIANTS[name]
    g = _Graph(defs or node_defs())
    ckpt = g.add("CheckpointLoaderSimple", 0, values=[v["ckpt"]])
    prev = None
    for i, (lora, s) in enumerate(LORAS):
        kw = {"loras": (prev, 0)} if prev else {}
        prev = g.add("DomergeLoraList", 1 + i, {"lora_name": lora, "strength": s}, **kw)
    opts = g.add(f"DomergeOptions_{METHOD}", 1)
    merge = g.add("DomergeMergeLoras", 3, {"method": METHOD}, loras=(prev, 0), model=(ckpt, 0), clip=(ckpt, 1),
                  options=(opts, 0))
    apply = g.add("DomergeApplyLora", 4, model=(ckpt, 0), clip=(ckpt, 1), lora=(merge, 0))
    pos = g.add("CLIPTextEncode", 5, values=["a watercolor fox in a snowy forest"], clip=(apply, 1))
    neg = g.add("CLIPTextEncode", 5, values=["blurry, lowres"], clip=(apply, 1))
    lat = g.add("EmptyLatentImage", 5, values=[v["size"], v["size"], 1])
    ks = g.add("KSampler", 6, values=[42, "fixed", 25, 7, "euler", "normal", 1], model=(apply, 0),
               positive=(pos, 0), negative=(neg, 0), latent_image=(lat, 0))
    dec = g.add("VAEDecode", 6, samples=(ks, 0), vae=(ckpt, 2))
    g.add("SaveImage", 6, values=["domerge"], images=(dec, 0))
    g.add("DomergeSaveLora", 4, {"filename_prefix": "domerge/merged"}, lora=(merge, 0))
    rep = g.add("DomergeMergeReport", 4, lora=(merge, 0))
    g.add("PreviewImage", 5, images=(rep, 0))
    g.add("PreviewAny", 5, values=[], source=(merge, 1))
    g.layout()
    return {"last_node_id": len(g.nodes), "last_link_id": len(g.links), "nodes": g.nodes, "links": g.links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def main() -> int:
    out = REPO / "example_workflows"
    out.mkdir(exist_ok=True)
    defs = node_defs()
    for name in VARIANTS:
        (out / name).write_text(json.dumps(build(name, defs), indent=2) + "\n")
        print("wrote", out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
