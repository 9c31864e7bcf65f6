"""Hardening, CLI level (issue 6): every bad input through ``python -m domerge_core`` in its own process.

Each run: exit code 2, exactly one stderr line ``error: ...`` naming the file, no traceback, no
output file, no temp file, inputs unchanged. Runs are forks of one warm interpreter (see
``test_hardening_support.ForkServer``: the same ``domerge_core/__main__.py`` in a fresh process,
without paying torch's import each time); ``test_hardening_signals.py`` also runs a genuinely
fresh ``python -m domerge_core`` process.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hardening_support import (BAD_INPUTS, assert_one_error_line, case_ids, file_bytes, listing,  # noqa: E402
                                    nobody_uid, server, write_good)

torch.set_num_threads(1)


def _setup(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    return str(inp), str(out)


def _inputs_snapshot(paths):
    return {p: file_bytes(p) for p in paths if os.path.isfile(p)}


def _check_clean(run, case, folders_before, inputs_before, target, *names):
    line = assert_one_error_line(run, *names)
    if case is not None and case.mention:
        assert any(m in line for m in case.mention), f"none of {case.mention} in {line!r}"
    assert not os.path.exists(target), "output written"
    assert listing(*folders_before) == folders_before, "files appeared or vanished (temp files?)"
    for p, b in inputs_before.items():
        assert file_bytes(p) == b, f"input {p} changed"
    if case is not None and case.pickle_marker:
        assert not os.path.exists(case.pickle_marker), "a pickle was unpickled"
    return line


def test_good_merge_exits_zero(tmp_path):
    """Positive control: the good fixtures merge through the CLI."""
    inp, out = _setup(tmp_path)
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    b = write_good(os.path.join(inp, "b.safetensors"), seed=2)
    target = os.path.join(out, "merged.safetensors")
    r = server().run(["merge", a, b, "-o", target, "-q"], cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(out) == ["merged.safetensors"]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_ids())
def test_cli_merge_refuses(case, tmp_path):
    inp, out = _setup(tmp_path)
    paths = case.build(inp)
    target = os.path.join(out, "merged.safetensors")
    before, snap = listing(inp, out, str(tmp_path)), _inputs_snapshot(paths)
    r = server().run(["merge", *paths, "-o", target], cwd=str(tmp_path))
    _check_clean(r, case, before, snap, target, *([case.culprit] if case.culprit else []))


# one case per kind of damage (the merge test above runs the whole catalogue)
CONVERT_SAMPLE = ("random bytes", "pickle named .safetensors", "header length past the end", "header not JSON",
                  "two tensors on the same bytes", "truncated inside the data", "keys of no known format (full checkpoint)",
                  "up/down rank mismatch", "NaN in a down factor", "bool factor", "alpha negative",
                  "rank larger than the layer", "zero-rank factors")


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c.name in CONVERT_SAMPLE], ids=lambda c: c.name)
def test_cli_convert_refuses(case, tmp_path):
    """Broken files through ``convert`` (reads every factor, writes one file)."""
    inp, out = _setup(tmp_path)
    paths = case.build(inp)
    bad = paths[-1]
    target = os.path.join(out, "converted.safetensors")
    before, snap = listing(inp, out, str(tmp_path)), _inputs_snapshot(paths)
    r = server().run(["convert", bad, "-o", target], cwd=str(tmp_path))
    _check_clean(r, case, before, snap, target, os.path.basename(bad))


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _pair(inp):
    return (write_good(os.path.join(inp, "a.safetensors"), seed=1),
            write_good(os.path.join(inp, "b.safetensors"), seed=2))


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_is_an_input(tmp_path, overwrite):
    inp, out = _setup(tmp_path)
    a, b = _pair(inp)
    before, snap = listing(inp, out), _inputs_snapshot([a, b])
    for target in (a, os.path.join(inp, ".", "b.safetensors")):
        r = server().run(["merge", a, b, "-o", target] + (["--overwrite"] if overwrite else []),
                         cwd=str(tmp_path))
        assert_one_error_line(r, os.path.basename(target))
        assert listing(inp, out) == before
        assert _inputs_snapshot([a, b]) == snap


def test_existing_output_needs_overwrite(tmp_path):
    inp, out = _setup(tmp_path)
    a, b = _pair(inp)
    target = os.path.join(out, "merged.safetensors")
    with open(target, "wb") as f:
        f.write(b"precious")
    r = server().run(["merge", a, b, "-o", target], cwd=str(tmp_path))
    assert_one_error_line(r, "merged.safetensors")
    assert file_bytes(target) == b"precious" and os.listdir(out) == ["merged.safetensors"]


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if c.name in
                                  ("random bytes", "NaN in a down factor", "SD1.5 + SDXL", "truncated inside the data")],
                         ids=lambda c: c.name)
def test_existing_output_survives_a_failed_merge(case, tmp_path):
    """--overwrite with a bad input: the old output is still there, byte for byte."""
    inp, out = _setup(tmp_path)
    paths = case.build(inp)
    target = os.path.join(out, "merged.safetensors")
    old = os.urandom(5000)
    with open(target, "wb") as f:
        f.write(old)
    r = server().run(["merge", *paths, "-o", target, "--overwrite"], cwd=str(tmp_path))
    assert_one_error_line(r, case.culprit)
    assert file_bytes(target) == old and os.listdir(out) == ["merged.safetensors"]


def test_output_folder_missing_or_a_folder(tmp_path):
    inp, out = _setup(tmp_path)
    a, b = _pair(inp)
    for target in (os.path.join(out, "nope", "m.safetensors"), out):
        r = server().run(["merge", a, b, "-o", target], cwd=str(tmp_path))
        assert_one_error_line(r, os.path.basename(target.rstrip("/")))
    assert os.listdir(out) == []


def _world_readable(tmp_path, *names):
    p = tmp_path
    while os.geteuid() == 0 and str(p) != p.anchor:   # nobody must reach the inputs (pytest dirs are 0700)
        if os.stat(p).st_uid == os.getuid() and not os.stat(p).st_mode & 0o001:
            os.chmod(p, os.stat(p).st_mode | 0o011)
        p = p.parent
    out = []
    for n in names:
        d = tmp_path / n
        d.mkdir()
        os.chmod(d, 0o755)
        out.append(str(d))
    return out


def test_read_only_output_folder(tmp_path):
    inp, ro = _world_readable(tmp_path, "in", "ro")
    a, b = _pair(inp)
    for p in (a, b):
        os.chmod(p, 0o644)
    os.chmod(ro, 0o555)
    target = os.path.join(ro, "merged.safetensors")
    uid = nobody_uid() if os.geteuid() == 0 else None    # root ignores permission bits
    r = server().run(["merge", a, b, "-o", target], cwd=ro, uid=uid)
    line = assert_one_error_line(r)
    assert "merged.safetensors" in line or ro in line, line
    assert os.listdir(ro) == []


@pytest.mark.parametrize("existing", [False, True])
def test_full_output_folder(tmp_path, existing):
    """RLIMIT_FSIZE of 4 KiB (SIGXFSZ ignored): every write past it fails with EFBIG, as on a
    full disk. One error line naming the output, no partial or temp file, old output intact."""
    inp, out = _setup(tmp_path)
    a, b = _pair(inp)
    target = os.path.join(out, "merged.safetensors")
    if existing:
        with open(target, "wb") as f:
            f.write(b"y" * 3000)
    r = server().run(["merge", a, b, "-o", target] + (["--overwrite"] if existing else []),
                     cwd=str(tmp_path), fsize=4096)
    assert_one_error_line(r, "merged.safetensors")
    assert os.listdir(out) == (["merged.safetensors"] if existing else [])
    if existing:
        assert file_bytes(target) == b"y" * 3000


@pytest.mark.parametrize("extra", [
    ["--weights", "1,nan"], ["--weights", "1"], ["--weights", "a,b"], ["--rank", "0"], ["--rank", "-3"],
    ["--energy", "1.5"], ["--method", "no-such-method"], ["--device", "cuda:7"], ["--device", "tpu"],
    ["--format", "loha"], ["--dtype", "int8"], ["--density", "7"],
], ids=lambda e: " ".join(e))
def test_bad_parameters(tmp_path, extra):
    """Bad options: exit 2, one line, nothing written."""
    inp, out = _setup(tmp_path)
    a, b = _pair(inp)
    target = os.path.join(out, "merged.safetensors")
    r = server().run(["merge", a, b, "-o", target, *extra], cwd=str(tmp_path))
    assert "Traceback" not in r.stderr
    assert r.rc == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    # argparse's own usage errors print "usage: ..." then "domerge merge: error: ..."
    assert lines and ("error:" in lines[-1]), r.stderr
    assert os.listdir(out) == []
