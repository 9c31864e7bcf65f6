"""The repo root is the ComfyUI custom-node folder: its ``__init__.py`` must load however it is
reached — as ComfyUI loads a pack (a package named after the folder, even ``comfyui-domerge``), and
as pytest loads it when the checkout's folder name is not a Python identifier (a loose module with no
package: the relative import failed there and every test of a ``git clone … comfyui-domerge`` errored)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LOAD = r"""
import importlib.util, json, os, sys
root, how = sys.argv[1], sys.argv[2]
init = os.path.join(root, "__init__.py")
if how == "comfyui":      # ComfyUI's load_custom_node: module named after the folder, a package
    spec = importlib.util.spec_from_file_location("comfyui-domerge", init, submodule_search_locations=[root])
else:                     # pytest with a non-identifier folder name: a loose module, no package
    spec = importlib.util.spec_from_file_location("__init__", init)
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
print(json.dumps(sorted(mod.NODE_CLASS_MAPPINGS)))
"""


def _load(how: str):
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", _LOAD, ROOT, how], capture_output=True, text=True, env=env,
                       cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_pack_loads_as_comfyui_and_as_a_loose_module_with_the_same_nodes():
    import json

    import domerge_nodes

    want = sorted(domerge_nodes.NODE_CLASS_MAPPINGS)
    assert "DomergeMergeLoras" in want
    assert json.loads(_load("comfyui")) == want
    assert json.loads(_load("loose")) == want
