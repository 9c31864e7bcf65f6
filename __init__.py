"""ComfyUI custom-node entry point: this folder is the node pack.

ComfyUI imports this file as a package but does not put the folder on sys.path, so the folder is
added here to make ``domerge_core`` importable as a top-level package (as it is when pip-installed).
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
except ImportError:  # nodes not built yet, or imported outside ComfyUI as a plain package
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
