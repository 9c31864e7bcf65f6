"""Screenshot of the example workflow in ComfyUI's web page, and the example workflows themselves.

    npm install --prefix /tmp/pw playwright-core          # once; Debian: apt-get install chromium
    NODE_PATH=/tmp/pw/node_modules .venv/bin/python tests/comfy_support/screenshot.py

Starts real ComfyUI (tests/comfy_support/server.py) with the tiny SD1.5 checkpoint and LoRAs stored
under ordinary-looking names, has the front end load the example graph (API format ->
``app.loadApiJson``), lays it out, saves ``docs/comfyui_workflow.png`` and writes the graph as the
front end serialises it (UI format) to ``example_workflows/domerge_sd15.json``; the SDXL variant
differs only in the checkpoint name and the latent size.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from comfy_support import library, runtime  # noqa: E402
from comfy_support.server import ComfyServer, widget_defaults  # noqa: E402

REPO = runtime.REPO
CKPT_SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
CKPT_SDXL = "sd_xl_base_1.0.safetensors"
LORAS = {"style_watercolor.safetensors": "tiny_kohya_a", "character_fox.safetensors": "tiny_peft_c"}


def example_graph(info) -> dict:
    merge = widget_defaults(info, "DomergeMergeLoras")
    merge.update({"loras": ["3", 0], "method": "do", "model": ["1", 0], "clip": ["1", 1]})
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_SD15}},
        "2": {"class_type": "DomergeLoraList", "inputs": {"lora_name": "style_watercolor.safetensors", "strength": 0.8}},
        "3": {"class_type": "DomergeLoraList", "inputs": {"lora_name": "character_fox.safetensors", "strength": 1.0,
                                                          "loras": ["2", 0]}},
        "4": {"class_type": "DomergeMergeLoras", "inputs": merge},
        "5": {"class_type": "DomergeApplyLora", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["4", 0],
                                                           "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox in a snowy forest", "clip": ["5", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["5", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 42, "steps": 25, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "domerge"}},
        "12": {"class_type": "DomergeSaveLora", "inputs": {"lora": ["4", 0], "filename_prefix": "domerge/merged",
                                                            "format": "kohya", "dtype": "fp16"}},
        "13": {"class_type": "DomergeMergeReport", "inputs": {"lora": ["4", 0]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def sdxl_variant(wf: dict) -> dict:
    wf = json.loads(json.dumps(wf))
    for node in wf["nodes"]:
        vals = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"] = [CKPT_SDXL]
        elif node["type"] == "EmptyLatentImage" and vals:
            vals[0], vals[1] = 1024, 1024
    return wf


def main() -> int:
    runtime.import_comfy_library()
    base = Path(tempfile.mkdtemp(prefix="domerge-shot-"))
    try:
        (base / "models" / "checkpoints").mkdir(parents=True)
        os.symlink(library.tiny_checkpoint(), base / "models" / "checkpoints" / CKPT_SD15)
        tiny = library.tiny_loras(base / "tiny")
        (base / "models" / "loras").mkdir(parents=True)
        for name, src in LORAS.items():
            shutil.copy2(tiny[src], base / "models" / "loras" / name)
        (base / "custom_nodes").mkdir()
        os.symlink(REPO, base / "custom_nodes" / "comfyui-domerge", target_is_directory=True)
        settings = base / "user" / "default" / "comfy.settings.json"     # no first-run dialogs
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                        "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
                                        "LiteGraph.Canvas.MinFontSizeForLOD": 1}))
        with ComfyServer(base) as srv:
            info = srv.get("/object_info")
            graph = example_graph(info)
            if "PreviewAny" not in info:
                del graph["15"]
            api_path = base / "api.json"
            api_path.write_text(json.dumps(graph))
            png = REPO / "docs" / "comfyui_workflow.png"
            wf_path = base / "workflow.json"
            png.parent.mkdir(exist_ok=True)
            r = subprocess.run(["node", str(HERE / "screenshot.cjs"), srv.url + "/", str(api_path), str(png),
                                str(wf_path)], capture_output=True, text=True, timeout=300)
            print(r.stdout, r.stderr[-3000:])
            if r.returncode != 0:
                return r.returncode
        wf = json.loads(wf_path.read_text())
        out = REPO / "example_workflows"
        out.mkdir(exist_ok=True)
        (out / "domerge_sd15.json").write_text(json.dumps(wf, indent=2) + "\n")
        (out / "domerge_sdxl.json").write_text(json.dumps(sdxl_variant(wf), indent=2) + "\n")
        print("wrote", png, out / "domerge_sd15.json", out / "domerge_sdxl.json")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
