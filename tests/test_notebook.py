"""The example notebook runs top to bottom in a real kernel (nbclient + ipykernel), offline.

Any cell error fails the test with the cell's source and the error. The kernel runs with one
torch thread (the notebook sets it) and no network is used: the pipeline is built from configs.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "merge_in_notebook.ipynb"


def test_example_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3": jupyter_client starts it with this interpreter (sys.executable), so the
    # notebook sees the same environment as the tests
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as e:  # the message holds the failing cell and its traceback
        raise AssertionError(f"notebook cell failed:\n{e}") from None
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "modules in the saved file" in text
    assert "exists" in text.lower()          # the second save was refused with a message
    # the panels were displayed as widgets (a widget view per panel)
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) >= 3
