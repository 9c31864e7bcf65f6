"""ComfyUI custom-node entry point: this folder is the node pack.

ComfyUI imports this file as a package but does not put the folder on sys.path, so the folder is
added here to make ``domerge_core`` importable as a top-level package (as it is when pip-installed).
Import errors are not swallowed: ComfyUI then lists the pack as IMPORT FAILED with the reason.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    # appended, not prepended: this folder's nodes/ must not shadow ComfyUI's own nodes.py
    sys.path.append(_here)

if __package__:           # ComfyUI (and pytest in a folder named like a Python package) import it as one
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:
    # loaded as a loose module: pytest does that with this file when the checkout's folder name is not
    # a Python identifier (``git clone … comfyui-domerge``); the same node classes, pip-installed name
    from domerge_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
