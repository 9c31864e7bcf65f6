"""Hardening, ComfyUI nodes (issue 6): the bad-input catalogue through the node functions.

Library mode (real ComfyUI packages in this process, ``folder_paths`` pointed at a temporary loras
folder; tests/comfy_support): every bad file is picked by name like the UI does, listed by
``DomergeLoraList`` and merged by ``DomergeMergeLoras``. Each must stop with a core error
(``DomergeError``, which ComfyUI shows as the node's error) that names the file — never another
exception type — and nothing may be written into the loras folder. Names from the graph cannot
leave the configured folders, and non-safetensors files are never opened.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from comfy_support import library, runtime  # noqa: E402
from test_hardening_support import (BAD_INPUTS, META, SD15, VICTIM, case_ids, file_bytes, kohya_tensors,  # noqa: E402
                                    listing, save, write_good)

torch.set_num_threads(1)
runtime.import_comfy_library()

import folder_paths  # noqa: E402

import domerge_core as dc  # noqa: E402
import domerge_nodes  # noqa: E402

M = domerge_nodes.NODE_CLASS_MAPPINGS


@pytest.fixture()
def loras_dir(tmp_path):
    dirs = library.setup_folders(tmp_path)
    return str(dirs["loras"])


def _refresh():
    folder_paths.filename_list_cache.clear()


def _widgets():
    req = M["DomergeMergeLoras"].INPUT_TYPES()["required"]
    return {k: v[1]["default"] for k, v in req.items()
            if k not in ("loras", "method") and isinstance(v[1], dict) and "default" in v[1]}


def _node_merge(names, method="do"):
    """What the graph does: LoRA list nodes chained, then the merge node (device cpu)."""
    lst = None
    for n in names:
        (lst,) = M["DomergeLoraList"]().build(n, 1.0, loras=lst)
    w = _widgets()
    w["device"] = "cpu"
    return M["DomergeMergeLoras"]().merge(lst, method, **w)


def test_good_files_merge_through_the_nodes(loras_dir):
    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    write_good(os.path.join(loras_dir, "b.safetensors"), seed=2)
    _refresh()
    lora, text = _node_merge(["a.safetensors", "b.safetensors"])
    assert len(lora) > 0 and "DO-Merge" in text


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_ids())
def test_node_refuses(case, loras_dir):
    paths = case.build(loras_dir)
    _refresh()
    names = [os.path.relpath(p, loras_dir) for p in paths]
    before = listing(loras_dir)
    snap = {p: file_bytes(p) for p in paths if os.path.isfile(p)}
    with pytest.raises(dc.DomergeError) as ei:
        _node_merge(names)
    msg = str(ei.value)
    assert "\n" not in msg.strip()
    if case.culprit:
        assert case.culprit in msg, msg
    assert listing(loras_dir) == before
    for p, b in snap.items():
        assert file_bytes(p) == b
    if case.pickle_marker:
        assert not os.path.exists(case.pickle_marker)


@pytest.mark.parametrize("name", [
    "../outside.safetensors", "sub/../../outside.safetensors", "{abs}", "/etc/passwd",
    "..\\outside.safetensors", "outside.safetensors\0.txt", "",
])
def test_names_cannot_leave_the_lora_folders(loras_dir, tmp_path, name):
    """A valid LoRA just outside the loras folder is never reachable by a crafted name."""
    outside = write_good(str(tmp_path / "outside.safetensors"), seed=3)
    sub = os.path.join(loras_dir, "sub")
    os.makedirs(sub)
    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    _refresh()
    name = name.replace("{abs}", outside)
    with pytest.raises(dc.DomergeError):
        (lst,) = M["DomergeLoraList"]().build(name, 1.0)
    with pytest.raises(dc.DomergeError):    # a list forged in the graph JSON skips the list node
        w = _widgets()
        w["device"] = "cpu"
        M["DomergeMergeLoras"]().merge([{"name": "a.safetensors", "strength": 1.0, "clip_strength": 1.0},
                                        {"name": name, "strength": 1.0, "clip_strength": 1.0}], "ta", **w)


def test_symlink_out_of_the_folder_is_not_followed_for_writing(loras_dir, tmp_path):
    """The save node's prefix cannot write through a symlinked subfolder pointing outside."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(loras_dir, "escape"))
    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    write_good(os.path.join(loras_dir, "b.safetensors"), seed=2)
    _refresh()
    lora, _ = _node_merge(["a.safetensors", "b.safetensors"], method="ta")
    with pytest.raises(dc.DomergeError):
        M["DomergeSaveLora"]().save(lora, "escape/merged", "kohya", "fp16")
    assert os.listdir(outside) == []


def test_pickle_files_are_not_listed_or_opened(loras_dir):
    case = next(c for c in BAD_INPUTS if c.name == "pickle .ckpt")
    case.build(loras_dir)
    _refresh()
    names = M["DomergeLoraList"].INPUT_TYPES()["required"]["lora_name"][0]
    assert "bad.ckpt" not in names and "good.safetensors" in names
    with pytest.raises(dc.DomergeError):
        M["DomergeLoraList"]().build("bad.ckpt", 1.0)
    assert not os.path.exists(case.pickle_marker)


@pytest.mark.parametrize("bad", ["nan", "not a tensor", "int", "empty"])
def test_save_node_refuses_a_broken_lora_model(loras_dir, bad):
    """A LORA_MODEL dict from elsewhere in the graph, broken: a core error; nothing written."""
    sd = kohya_tensors(SD15, seed=2)
    if bad == "nan":
        t = sd[VICTIM + ".lora_up.weight"].clone()
        t[0, 0] = float("nan")
        sd[VICTIM + ".lora_up.weight"] = t
    elif bad == "not a tensor":
        sd[VICTIM + ".alpha"] = 4.0
    elif bad == "int":
        sd[VICTIM + ".lora_down.weight"] = sd[VICTIM + ".lora_down.weight"].to(torch.int32)
    else:
        sd = {}
    before = listing(loras_dir)
    with pytest.raises(dc.DomergeError):
        M["DomergeSaveLora"]().save(sd, "merged", "kohya", "fp16")
    # the node may create the (empty) default subfolder, but no file
    files = [os.path.join(r, f) for r, _, fs in os.walk(loras_dir) for f in fs]
    assert files == [os.path.join(loras_dir, n) for n in before[loras_dir]]


def test_cancel_in_the_node_writes_nothing(loras_dir, tmp_path):
    """ComfyUI's Cancel (processing interrupted) stops the merge at the next progress report;
    the save node never runs, and nothing is written."""
    import comfy.model_management as mm

    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    write_good(os.path.join(loras_dir, "b.safetensors"), seed=2)
    _refresh()
    before = listing(loras_dir)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(BaseException) as ei:
            _node_merge(["a.safetensors", "b.safetensors"])
        assert type(ei.value).__name__ == "InterruptProcessingException", repr(ei.value)
    finally:
        mm.interrupt_current_processing(False)
    assert listing(loras_dir) == before


@pytest.mark.parametrize("meta", [False, True])
def test_node_error_names_the_file_not_a_temp(loras_dir, meta):
    """NaN factor: the node error names the listed file and the module."""
    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    sd = kohya_tensors(SD15, seed=2)
    t = sd[VICTIM + ".lora_down.weight"].clone()
    t[0, 0] = float("inf")
    sd[VICTIM + ".lora_down.weight"] = t
    save(sd, os.path.join(loras_dir, "b.safetensors"), META["sd15"] if meta else None)
    _refresh()
    with pytest.raises(dc.DomergeError) as ei:
        _node_merge(["a.safetensors", "b.safetensors"])
    assert "b.safetensors" in str(ei.value) and "attn1_to_k" in str(ei.value)
