"""Hardening, notebook widgets (issue 6): the bad-input catalogue through ``MergePanel``.

Each bad file must end as a message in the panel — in its own row (unreadable file: the row is
disabled) or in the status line after Merge — naming the file; never as a traceback or an
"unexpected error" (a non-core exception), and nothing may be written. Save failures (existing
file, an input as target, a full disk) and Cancel are shown in the panel and leave no file.
"""
from __future__ import annotations

import html
import json
import os
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_hardening_support import BAD_INPUTS, case_ids, file_bytes, listing, server, write_good  # noqa: E402

torch.set_num_threads(1)

from domerge_widgets.panel import MergePanel  # noqa: E402


def _panel_text(panel) -> str:
    """Everything the panel shows as text: rows' info cells and the status line."""
    parts = [r.info.value for r in panel.rows] + [panel.status.value]
    return html.unescape(" ".join(parts))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_ids())
def test_panel_shows_the_error(case, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    paths = case.build(str(inp))
    before = listing(str(inp), str(out))
    snap = {p: file_bytes(p) for p in paths if os.path.isfile(p)}
    panel = MergePanel(loras=paths, method="do", device="cpu", background=False, output_dir=str(out))
    row_errors = [r.error for r in panel.rows if r.error]
    if not row_errors:
        panel.merge()
    text = _panel_text(panel)
    assert panel.last_traceback is None, panel.last_traceback
    assert "unexpected error" not in text and "Traceback" not in text, text
    shown = row_errors or ([panel.last_error] if panel.last_error else [])
    assert shown, f"no error shown; status: {html.unescape(panel.status.value)}"
    if case.culprit:
        assert any(case.culprit in m for m in shown), shown
    assert panel.result is None or row_errors, "a merge result exists for a bad input"
    assert listing(str(inp), str(out)) == before
    for p, b in snap.items():
        assert file_bytes(p) == b
    if case.pickle_marker:
        assert not os.path.exists(case.pickle_marker)


def _good_panel(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    a = write_good(str(inp / "a.safetensors"), seed=1)
    b = write_good(str(inp / "b.safetensors"), seed=2)
    panel = MergePanel(loras=[a, b], method="ta", device="cpu", background=False, output_dir=str(out))
    panel.merge()
    assert panel.result is not None and panel.last_error is None, panel.last_error
    return panel, a, b, str(out)


def test_save_refusals_are_shown(tmp_path):
    panel, a, b, out = _good_panel(tmp_path)
    old_a = file_bytes(a)
    # onto an input, even with replace ticked
    panel.overwrite.value = True
    assert panel.save(a) is None
    assert "a.safetensors" in panel.last_error and file_bytes(a) == old_a
    # onto an existing file without replace
    panel.overwrite.value = False
    existing = os.path.join(out, "taken.safetensors")
    with open(existing, "wb") as f:
        f.write(b"keep me")
    assert panel.save("taken.safetensors") is None
    assert "taken.safetensors" in html.unescape(panel.status.value)
    assert file_bytes(existing) == b"keep me"
    # into a folder that does not exist
    assert panel.save("no/such/dir/x.safetensors") is None
    assert sorted(os.listdir(out)) == ["taken.safetensors"]


_FULL_DISK = r'''
import json, os, sys
sys.path.insert(0, {tests!r})
from domerge_widgets.panel import MergePanel
p = MergePanel(loras={paths!r}, method="ta", device="cpu", background=False, output_dir={out!r})
p.merge()
assert p.result is not None, p.last_error
written = p.save("merged.safetensors")
print(json.dumps({{"written": written, "error": p.last_error, "traceback": p.last_traceback,
                  "status": p.status.value}}))
'''


def test_full_disk_on_save_is_shown(tmp_path):
    """Save under RLIMIT_FSIZE (EFBIG, as on a full disk), in a forked process: the panel shows one
    message naming the file; no partial or temp file is left."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    a = write_good(str(inp / "a.safetensors"), seed=1)
    b = write_good(str(inp / "b.safetensors"), seed=2)
    code = _FULL_DISK.format(tests=HERE, paths=[a, b], out=str(out))
    r = server().run(code=code, fsize=4096)
    assert r.rc == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["written"] is None
    assert res["error"] and "merged.safetensors" in res["error"], res
    assert "internal error" not in res["error"] and "too large" in res["error"].lower(), res
    assert os.listdir(out) == []


def test_cancel_keeps_the_previous_result_and_writes_nothing(tmp_path):
    """Cancel during a background merge (real-shape SD1.5 inputs): the panel says so, the previous
    result stays, nothing is written."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    import synthetic

    d = tmp_path / "real"
    paths = synthetic.write_set(str(d), model="sd15", count=2, rank=16, te=False)
    out = tmp_path / "out"
    out.mkdir()
    panel = MergePanel(loras=paths, method="do", device="cpu", background=True, output_dir=str(out))
    started = []
    panel.on_progress.append(lambda done, total, stage: started.append(done))
    before = listing(str(d), str(out))
    panel.merge()
    t_end = time.monotonic() + 120
    while not started and time.monotonic() < t_end:
        time.sleep(0.005)
    assert started, "the merge never reported progress"
    panel.cancel()
    assert panel.wait(120)
    assert panel.result is None
    assert "cancel" in html.unescape(panel.status.value).lower()
    assert panel.last_traceback is None
    assert listing(str(d), str(out)) == before
