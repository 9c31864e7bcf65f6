"""Run ComfyUI's main.py with `tv_shim` applied: ``python launch.py <comfyui dir> [main.py args]``.

The caller puts this folder (and the torchvision overlay, if any) on PYTHONPATH.
"""
import os
import runpy
import sys

import tv_shim

tv_shim.install()
root = os.path.abspath(sys.argv[1])
sys.argv = [os.path.join(root, "main.py"), *sys.argv[2:]]
sys.path.insert(0, root)
runpy.run_path(sys.argv[0], run_name="__main__")
