"""Hardening, API surface (issue 6): bad arguments, cancellation, in-memory state dicts, the
public names themselves, and "no pickle path anywhere" (core, nodes, widgets).
"""
from __future__ import annotations

import ast
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_hardening_support import META, REPO, SD15, VICTIM, kohya_tensors, server, write_good  # noqa: E402

import domerge_core as dc  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture()
def pair(tmp_path):
    a = write_good(str(tmp_path / "a.safetensors"), seed=1)
    b = write_good(str(tmp_path / "b.safetensors"), seed=2)
    return [dc.load_lora(a), dc.load_lora(b)]


@pytest.mark.parametrize("kw", [
    dict(method="no-such-method"), dict(weights=[1.0]), dict(weights=[1.0, float("nan")]),
    dict(weights=[1.0, float("inf")]), dict(rank=0), dict(rank=-2), dict(rank=2.5), dict(energy=0.0),
    dict(energy=1.5), dict(energy=float("nan")), dict(device="tpu"), dict(device="cuda:9"),
    dict(compute_dtype=torch.float16), dict(params={"no_such_param": 1}), dict(params={"density": 7.0}),
    dict(params={"lam": float("nan")}), dict(method="ties", params={"density": -1.0}),
    dict(method="dare", params={"density": 0.0}),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_arguments_raise_core_errors(pair, kw):
    kw = dict(kw)
    method = kw.pop("method", "do")
    with pytest.raises(dc.DomergeError):
        dc.merge(pair, method=method, **{"device": "cpu", **kw})


@pytest.mark.parametrize("bad", [[], [42], ["/no/such/file.safetensors"], [None]], ids=repr)
def test_bad_input_lists(bad):
    with pytest.raises(dc.DomergeError):
        dc.merge(bad, method="ta", device="cpu")


@pytest.mark.parametrize("exc", ["cancel", "interrupt"])
def test_cancel_from_the_progress_callback(pair, tmp_path, exc):
    """The callback raising stops the merge; no result, nothing written (nothing could be)."""
    calls = []

    def progress(done, total, stage):
        calls.append(stage)
        if len(calls) == 2:
            raise dc.MergeCancelled("stop") if exc == "cancel" else KeyboardInterrupt()

    before = sorted(os.listdir(tmp_path))
    with pytest.raises(dc.MergeCancelled if exc == "cancel" else KeyboardInterrupt):
        dc.merge(pair, method="do", device="cpu", progress=progress)
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("bad", ["nan", "not a tensor", "int factor", "no modules", "rank mismatch"])
def test_load_state_dict_refuses(bad):
    """In-memory state dicts (ComfyUI's LORA_MODEL) get the same checks as files."""
    sd = kohya_tensors(SD15, seed=2)
    if bad == "nan":
        t = sd[VICTIM + ".lora_down.weight"].clone()
        t[0, 0] = float("nan")
        sd[VICTIM + ".lora_down.weight"] = t
    elif bad == "not a tensor":
        sd[VICTIM + ".alpha"] = "4"
    elif bad == "int factor":
        sd[VICTIM + ".lora_up.weight"] = sd[VICTIM + ".lora_up.weight"].to(torch.int16)
    elif bad == "no modules":
        sd = {}
    else:
        sd[VICTIM + ".lora_up.weight"] = sd[VICTIM + ".lora_up.weight"][:, :2].contiguous()
    with pytest.raises(dc.DomergeError) as ei:
        lora = dc.load_state_dict(sd, source="LORA_MODEL", metadata=META["sd15"])
        for m in lora:
            m.factors()
    assert "LORA_MODEL" in str(ei.value)


_SHADOW = r'''
import importlib, json, pkgutil, sys, types
for name in [m for m in sys.modules if m == "domerge_core" or m.startswith("domerge_core.")]:
    del sys.modules[name]          # a fresh package state (torch stays imported: it is not tested)
import domerge_core as dc
first = {first}
if first == "every submodule":    # what any adapter or test may do: import a submodule directly
    for info in pkgutil.walk_packages(dc.__path__, "domerge_core."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
else:
    getattr(dc, first)
shadowed = [n for n in dc.__all__ if n != "__version__" and isinstance(getattr(dc, n), types.ModuleType)]
print(json.dumps({{"callable": callable(dc.merge), "type": type(dc.merge).__name__, "shadowed": shadowed}}))
'''


@pytest.mark.parametrize("first", ["MergeResult", "every submodule", "analyze", "MergeCache"])
def test_public_names_are_never_shadowed_by_submodules(first):
    """Every public name must stay what it is whatever was touched first. (With the lazy
    ``__getattr__``, a submodule named like a public function -- it was ``domerge_core/merge.py`` --
    gets bound as the package attribute when it is imported, and ``__getattr__`` is never asked
    again: ``dc.merge(...)`` -> TypeError: 'module' object is not callable.) A forked process per
    case with the package freshly imported: its state is what is tested."""
    r = server().run(code=_SHADOW.format(first=repr(first)))
    assert r.rc == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["callable"] and not res["shadowed"], f"after touching {first!r} first: {res}"


# ------------------------------------------------------------------------------------------------
# no pickle path anywhere
# ------------------------------------------------------------------------------------------------
FORBIDDEN_CALLS = {
    ("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
    ("cPickle", "load"), ("dill", "load"), ("joblib", "load"), ("np", "load"), ("numpy", "load"),
    ("utils", "load_torch_file"), ("comfy.utils", "load_torch_file"), ("torch.serialization", "load"),
}
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "joblib", "_pickle", "shelve"}
SCANNED = ("domerge_core", "nodes", "widgets", "__init__.py")


def _py_files():
    for entry in SCANNED:
        root = os.path.join(REPO, entry)
        if os.path.isfile(root):
            yield root
            continue
        for d, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    return ""


def test_no_pickle_path_in_shipped_code():
    """Only safetensors are read: no torch.load / pickle / load_torch_file in the core, the nodes or
    the widgets (the test-only fixtures that *write* pickles are not shipped)."""
    hits = []
    files = list(_py_files())
    assert len(files) > 10
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in FORBIDDEN_IMPORTS:
                        hits.append(f"{path}:{node.lineno}: import {a.name}")
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if mod.split(".")[0] in FORBIDDEN_IMPORTS or any(
                        a.name in ("load_torch_file",) or (mod == "torch" and a.name == "load") for a in node.names):
                    hits.append(f"{path}:{node.lineno}: from {mod} import ...")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                parts = name.rsplit(".", 1)
                if len(parts) == 2 and tuple(parts) in FORBIDDEN_CALLS:
                    hits.append(f"{path}:{node.lineno}: {name}(...)")
                if name.endswith("load_torch_file"):
                    hits.append(f"{path}:{node.lineno}: {name}(...)")
    assert not hits, "pickle paths:\n" + "\n".join(hits)
