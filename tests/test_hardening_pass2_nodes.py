"""Hardening, second pass (issue 14), ComfyUI nodes: the new bad-file catalogue picked by name and
merged by the nodes (a core error naming the file, nothing written), inputs changing under a running
merge (an error, not a SIGBUS that takes the server down), and Save prefixes with control characters.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from comfy_support import library, runtime  # noqa: E402
from test_hardening_support import PASS2_INPUTS, file_bytes, listing, pass2_ids, write_good  # noqa: E402

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


def _node_merge(names, method="ta"):
    req = M["DomergeMergeLoras"].INPUT_TYPES()["required"]
    w = {k: v[1]["default"] for k, v in req.items()
         if k not in ("loras", "method") and isinstance(v[1], dict) and "default" in v[1]}
    w["device"] = "cpu"
    lst = [{"name": n, "strength": 1.0, "clip_strength": 1.0} for n in names]
    return M["DomergeMergeLoras"]().merge(lst, method, **w)


@pytest.mark.parametrize("case", PASS2_INPUTS, ids=pass2_ids())
def test_node_refuses_pass2(case, loras_dir):
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


def test_input_truncated_under_a_running_node_merge(loras_dir, monkeypatch):
    """The server survives: a core error naming the file (it used to die of SIGBUS)."""
    a = write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    write_good(os.path.join(loras_dir, "b.safetensors"), seed=2)
    _refresh()
    orig = dc.load_lora
    loaded = []

    def load_then_truncate(path, *args, **kw):
        lora = orig(path, *args, **kw)
        loaded.append(path)
        if len(loaded) == 2:              # both open: a shrinks before its factors are read
            os.truncate(a, os.path.getsize(a) // 2)
        return lora

    monkeypatch.setattr(dc, "load_lora", load_then_truncate)
    with pytest.raises(dc.LoraFormatError) as ei:
        _node_merge(["a.safetensors", "b.safetensors"])
    assert "a.safetensors" in str(ei.value) and "changed while being read" in str(ei.value)


@pytest.mark.parametrize("prefix", ["bad\nname", "ansi\x1b[2J", "nul\x00x", "bell\x07", "cr\rname", "sep\u2028x",
                                    "bidi\u202eexe.txt", "del\x7f", "tab\tname", "sub/c1\x9bname"])
def test_save_prefix_with_control_characters_is_refused(loras_dir, prefix):
    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    write_good(os.path.join(loras_dir, "b.safetensors"), seed=2)
    _refresh()
    assert M["DomergeSaveLora"].VALIDATE_INPUTS(filename_prefix=prefix) is not True
    lora, _ = _node_merge(["a.safetensors", "b.safetensors"])
    before = listing(loras_dir)
    with pytest.raises(dc.DomergeError) as ei:
        M["DomergeSaveLora"]().save(lora, prefix, "kohya", "fp16")
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value)
    assert listing(loras_dir) == before


def test_save_race_for_one_name_takes_the_next_counter(loras_dir, monkeypatch):
    """Two saves that choose the same ``_NNNNN`` name: the one that publishes second does not fail
    with "exists" (nor replace the first file) but takes the next free counter. The race is made
    deterministic: the competing save runs, for real, right after the first one chose its name."""
    from domerge_nodes import save_node

    write_good(os.path.join(loras_dir, "a.safetensors"), seed=1)
    write_good(os.path.join(loras_dir, "b.safetensors"), seed=2)
    _refresh()
    lora, _ = _node_merge(["a.safetensors", "b.safetensors"])
    real = save_node.output_path
    state = {"raced": False}

    def chosen_then_taken(prefix, start=1):
        got = real(prefix, start)
        if not state["raced"]:
            state["raced"] = True
            state["other"] = M["DomergeSaveLora"]().save(lora, prefix, "kohya", "fp32")["result"][0]
        return got

    monkeypatch.setattr(save_node, "output_path", chosen_then_taken)
    first = M["DomergeSaveLora"]().save(lora, "race/m", "kohya", "fp16")["result"][0]
    assert state["other"] == "race/m_00001.safetensors"
    assert first == "race/m_00002.safetensors"
    a = dc.load_lora(os.path.join(loras_dir, state["other"]))
    b = dc.load_lora(os.path.join(loras_dir, first))
    assert a.dtype == torch.float32 and b.dtype == torch.float16      # the first file was kept as written
