"""Hardening, API level (issue 6): broken and hostile files through the core's public names.

Every bad input must raise a :class:`DomergeError` subclass (one line, naming the file — and the
module where the problem is in a module), write nothing, leave no temp file and change no input.
Random corruptions (hypothesis, derandomized) of real safetensors files must never escape as any
other exception, and a merge that does succeed must not write a non-finite number.
"""
from __future__ import annotations

import math
import os
import struct
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hardening_support import (BAD_INPUTS, META, SD15, VICTIM, api_merge, case_ids, file_bytes,  # noqa: E402
                                    kohya_tensors, listing, one_line, raw_file, regions, save, server,
                                    split_file, write_good)

import domerge_core as dc  # noqa: E402

torch.set_num_threads(1)

SETTINGS = dict(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _folders(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    return str(inp), str(out)


def _snapshot(paths):
    return {p: file_bytes(p) for p in paths if os.path.isfile(p)}


def _assert_nothing_written(inp, out, before, inputs_before, target):
    assert not os.path.exists(target), f"{target} was written"
    assert listing(inp, out) == before, "a file appeared or vanished (temp file left behind?)"
    for p, b in inputs_before.items():
        assert file_bytes(p) == b, f"input {p} changed"


def _assert_finite_file(path):
    from safetensors.torch import load_file

    for k, v in load_file(path).items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{path}: {k} holds non-finite values"


# ------------------------------------------------------------------------------------------------
# the catalogue
# ------------------------------------------------------------------------------------------------
def test_good_inputs_merge(tmp_path):
    """Positive control: the fixtures the bad inputs are made from do merge."""
    inp, out = _folders(tmp_path)
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    b = write_good(os.path.join(inp, "b.safetensors"), seed=2)
    target = os.path.join(out, "merged.safetensors")
    api_merge([a, b], target, method="do")
    _assert_finite_file(target)
    assert len(dc.load_lora(target)) == len(SD15)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_ids())
def test_api_refuses(case, tmp_path):
    inp, out = _folders(tmp_path)
    paths = case.build(inp)
    target = os.path.join(out, "merged.safetensors")
    before, inputs_before = listing(inp, out), _snapshot(paths)
    with pytest.raises(dc.DomergeError) as ei:
        api_merge(paths, target, method="do")
    msg = one_line(ei.value)
    if case.culprit:
        assert case.culprit in msg, f"file not named: {msg!r}"
    if case.mention:
        assert any(m in msg for m in case.mention), f"none of {case.mention} named: {msg!r}"
    if case.error:
        assert type(ei.value).__name__ == case.error, f"{type(ei.value).__name__}: {msg}"
    _assert_nothing_written(inp, out, before, inputs_before, target)
    if case.pickle_marker:
        assert not os.path.exists(case.pickle_marker), "a pickle was unpickled"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_factor_every_method(tmp_path, value):
    """NaN/Inf factors are refused whatever the method, naming file and module."""
    inp, out = _folders(tmp_path)
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    sd = kohya_tensors(SD15, seed=2)
    t = sd[VICTIM + ".lora_up.weight"].clone()
    t[3, 2] = value
    sd[VICTIM + ".lora_up.weight"] = t
    b = save(sd, os.path.join(inp, "b.safetensors"), META["sd15"])
    methods = dc.method_names()
    assert methods, "no merge method registered"
    for method in methods:
        target = os.path.join(out, f"{method}.safetensors")
        with pytest.raises(dc.DomergeError) as ei:
            api_merge([a, b], target, method=method)
        msg = one_line(ei.value)
        assert "b.safetensors" in msg and ("attn1_to_k" in msg or "attn1.to_k" in msg), (method, msg)
        assert not os.path.exists(target)
    assert sorted(os.listdir(out)) == []


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _merged(tmp_path):
    inp, out = _folders(tmp_path)
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    b = write_good(os.path.join(inp, "b.safetensors"), seed=2)
    loras = [dc.load_lora(a), dc.load_lora(b)]
    return inp, out, a, b, dc.merge(loras, method="ta", device="cpu")


def test_save_onto_an_input_is_refused(tmp_path):
    inp, out, a, b, result = _merged(tmp_path)
    before = file_bytes(a)
    for overwrite in (False, True):
        with pytest.raises(dc.DomergeError) as ei:
            result.save(a, overwrite=overwrite)
        assert "a.safetensors" in one_line(ei.value)
        assert file_bytes(a) == before
    assert sorted(os.listdir(inp)) == ["a.safetensors", "b.safetensors"]


def test_save_onto_an_existing_file_is_refused(tmp_path):
    inp, out, a, b, result = _merged(tmp_path)
    target = os.path.join(out, "merged.safetensors")
    with open(target, "wb") as f:
        f.write(b"precious bytes")
    with pytest.raises(dc.OutputExistsError) as ei:
        result.save(target)
    assert "merged.safetensors" in one_line(ei.value)
    assert file_bytes(target) == b"precious bytes"
    assert os.listdir(out) == ["merged.safetensors"]
    result.save(target, overwrite=True)              # and the explicit flag does replace it
    assert file_bytes(target) != b"precious bytes"
    assert os.listdir(out) == ["merged.safetensors"]


def test_save_to_a_folder_or_missing_folder_is_refused(tmp_path):
    inp, out, a, b, result = _merged(tmp_path)
    for target in (out, os.path.join(out, "no", "such", "dir", "m.safetensors")):
        with pytest.raises(dc.DomergeError):
            result.save(target)
    assert os.listdir(out) == []


_API_SAVE = r'''
import json, os, sys, traceback
sys.path.insert(0, {tests!r})
import domerge_core as dc
from test_hardening_support import api_merge
try:
    api_merge({paths!r}, {target!r}, method="ta", overwrite={overwrite!r})
    print(json.dumps({{"ok": True}}))
except BaseException as e:
    print(json.dumps({{"ok": False, "type": type(e).__name__, "domerge": isinstance(e, dc.DomergeError),
                      "msg": str(e), "mro": [c.__name__ for c in type(e).__mro__],
                      "traceback": traceback.format_exc()}}))
'''


def _api_in_child(paths, target, overwrite=False, **limits):
    import json

    code = _API_SAVE.format(tests=os.path.dirname(os.path.abspath(__file__)), paths=list(paths), target=target,
                            overwrite=overwrite)
    r = server().run(code=code, **limits)
    assert r.rc == 0 and r.stdout.strip(), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _world_readable_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    p = tmp_path
    while os.geteuid() == 0 and str(p) != p.anchor:   # nobody must reach the inputs (pytest dirs are 0700)
        if os.stat(p).st_uid == os.getuid() and not os.stat(p).st_mode & 0o001:
            os.chmod(p, os.stat(p).st_mode | 0o011)
        p = p.parent
    return str(d)


def test_read_only_output_folder(tmp_path):
    """A folder the user may not write to: a core error naming the output, nothing left behind."""
    from test_hardening_support import nobody_uid

    inp = _world_readable_dir(tmp_path, "in")
    ro = _world_readable_dir(tmp_path, "ro")
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    b = write_good(os.path.join(inp, "b.safetensors"), seed=2)
    for p in (a, b):
        os.chmod(p, 0o644)
    os.chmod(ro, 0o555)
    target = os.path.join(ro, "merged.safetensors")
    # root ignores permission bits: run the merge as nobody then
    res = _api_in_child([a, b], target, uid=nobody_uid() if os.geteuid() == 0 else None)
    assert not res["ok"], "merged into a read-only folder?"
    assert res["domerge"], f"not a core error: {res}"
    assert "merged.safetensors" in res["msg"] or ro in res["msg"], res
    assert os.listdir(ro) == []


@pytest.mark.parametrize("existing", [False, True])
def test_full_output_folder(tmp_path, existing):
    """Writes fail with EFBIG past RLIMIT_FSIZE (a full disk as far as the writer can tell): a core
    error naming the output; no partial file; an existing output survives byte for byte."""
    inp, out = _folders(tmp_path)
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    b = write_good(os.path.join(inp, "b.safetensors"), seed=2)
    target = os.path.join(out, "merged.safetensors")
    if existing:
        with open(target, "wb") as f:
            f.write(b"x" * 1000)
    res = _api_in_child([a, b], target, overwrite=existing, fsize=4096)
    assert not res["ok"], "a >4 KiB merge fit in 4 KiB?"
    assert res["domerge"], f"not a core error: {res}"
    assert "merged.safetensors" in res["msg"], res
    assert os.listdir(out) == (["merged.safetensors"] if existing else [])
    if existing:
        assert file_bytes(target) == b"x" * 1000


def test_sparse_terabyte_file_is_refused_before_allocating(tmp_path):
    """A header declaring a 4 TiB factor over a file that really is 4 TiB long (sparse): the size
    check passes, so only a check of the declared shape can stop the allocation. Run with an
    address-space limit of +6 GiB so a failure is a clean MemoryError, never an OOM kill."""
    inp, out = _folders(tmp_path)
    a = write_good(os.path.join(inp, "a.safetensors"), seed=1)
    n, header, data = split_file(file_bytes(write_good(os.path.join(inp, "src.safetensors"), seed=2)))
    os.remove(os.path.join(inp, "src.safetensors"))
    key = VICTIM + ".lora_down.weight"
    cols = 1 << 39
    # move the victim's down factor to the end and make it 4 TiB
    old = header[key]["data_offsets"]
    size = 4 * cols * 2
    header[key] = {"dtype": "F16", "shape": [4, cols], "data_offsets": [len(data), len(data) + size]}
    blob = raw_file(header, data)
    bad = os.path.join(inp, "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(blob)
        f.truncate(len(blob) + size)
    try:
        assert os.stat(bad).st_size > 1 << 42 and os.stat(bad).st_blocks * 512 < 1 << 24
        target = os.path.join(out, "merged.safetensors")
        res = _api_in_child([a, bad], target, as_extra=6 << 30)
        assert not res["ok"]
        assert res["domerge"], f"not refused by the core (allocation attempted?): {res}"
        assert "bad.safetensors" in res["msg"], res
        # refused for what it declares, not because an allocation (or a 4 TiB mmap) failed
        low = res["msg"].lower()
        assert not any(w in low for w in ("allocate", "os error 12", "out of memory", "memoryerror")), \
            f"the core tried to map/allocate the 4 TiB factor and failed, instead of refusing it: {res['msg']}"
        assert os.listdir(out) == []
        del old
    finally:
        os.remove(bad)


# ------------------------------------------------------------------------------------------------
# hypothesis: corruptions of a real file
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_blob(tmp_path_factory):
    d = tmp_path_factory.mktemp("blob")
    return file_bytes(write_good(str(d / "src.safetensors"), seed=2))


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    write_good(str(d / "good.safetensors"), seed=1)
    return str(d)


def _attempt(pair_dir, blob, name="bad.safetensors", method="do"):
    """Write ``blob`` beside the good file and merge; returns None on success (output checked
    finite) or the DomergeError. Anything else propagates and fails the test."""
    bad = os.path.join(pair_dir, name)
    out_dir = os.path.join(pair_dir, "out")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "m.safetensors")
    for stale in os.listdir(out_dir):     # a failed earlier example must not poison this one
        os.remove(os.path.join(out_dir, stale))
    with open(bad, "wb") as f:
        f.write(blob)
    before = sorted(os.listdir(pair_dir))
    try:
        api_merge([os.path.join(pair_dir, "good.safetensors"), bad], target, method=method)
    except dc.DomergeError as e:
        msg = one_line(e)
        assert not os.path.exists(target)
        assert sorted(os.listdir(pair_dir)) == before and os.listdir(out_dir) == []
        return msg
    else:
        _assert_finite_file(target)
        os.remove(target)
        return None
    finally:
        os.remove(bad)


@settings(**SETTINGS)
@given(region=st.sampled_from(["length", "header", "data"]), frac=st.floats(0, 1, exclude_max=True))
def test_truncation_anywhere_is_refused(good_blob, pair_dir, region, frac):
    lo, hi = regions(good_blob)[region]
    cut = lo + int(frac * (hi - lo))
    msg = _attempt(pair_dir, good_blob[:cut])
    assert msg is not None, f"a file truncated at byte {cut} ({region}) merged"
    assert "bad.safetensors" in msg, msg


@pytest.mark.parametrize("where", ["length", "header", "data"])
def test_truncation_at_region_boundaries(good_blob, pair_dir, where):
    lo, hi = regions(good_blob)[where]
    for cut in sorted({lo, lo + 1, hi - 1}):
        msg = _attempt(pair_dir, good_blob[:cut])
        assert msg is not None and "bad.safetensors" in msg, (where, cut, msg)


@settings(**SETTINGS)
@given(data=st.data())
def test_byte_flips_never_escape(good_blob, pair_dir, data):
    """Overwrite 1-4 bytes anywhere (length, header, data): refused cleanly or merged to finite numbers."""
    blob = bytearray(good_blob)
    n = data.draw(st.integers(1, 4))
    region = data.draw(st.sampled_from(["length", "header", "header", "data"]))
    lo, hi = regions(good_blob)[region]
    for _ in range(n):
        pos = data.draw(st.integers(lo, hi - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    _attempt(pair_dir, bytes(blob))


_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2",
           "U64", "X9", ""]


@settings(**SETTINGS)
@given(data=st.data())
def test_lying_header_entries_never_escape(good_blob, pair_dir, data):
    """One tensor entry's dtype, shape or offsets replaced by something else: a clean refusal, or (if
    the lie happens to be consistent) a merge with finite numbers."""
    n, header, body = split_file(good_blob)
    keys = sorted(header)
    key = data.draw(st.sampled_from([k for k in keys if k != "__metadata__"]))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
    entry = header[key]
    if field == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(_DTYPES))
    elif field == "shape":
        entry["shape"] = data.draw(st.lists(st.integers(-2, 2 ** 33), min_size=0, max_size=4))
    elif field == "data_offsets":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = [b + data.draw(st.integers(-64, 64)), e + data.draw(st.integers(-64, 64))]
    else:
        entry.pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    msg = _attempt(pair_dir, raw_file(header, body))
    if field == "drop":
        assert msg is not None


@settings(**SETTINGS)
@given(alpha=st.one_of(st.sampled_from([0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf")]),
                       st.floats(allow_nan=True, allow_infinity=True, width=32)))
def test_alpha_values(pair_dir, alpha):
    """alpha <= 0 or not finite: refused naming the module; a positive finite alpha merges (finite)."""
    sd = kohya_tensors(SD15, seed=2)
    sd[VICTIM + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    from safetensors.torch import save as st_save

    msg = _attempt(pair_dir, st_save(sd, metadata=META["sd15"]))
    if not (math.isfinite(alpha) and alpha > 0):
        assert msg is not None, f"alpha {alpha} accepted"
        assert "bad.safetensors" in msg and ("attn1_to_k" in msg or "attn1.to_k" in msg), msg
    elif 1e-6 < alpha < 1e6:
        assert msg is None, f"alpha {alpha} refused: {msg}"


def test_header_padding_is_fine(good_blob, pair_dir):
    """Positive control: trailing spaces in the header (allowed by the format) load."""
    n, header, body = split_file(good_blob)
    text = good_blob[8:8 + n].decode() + " " * 13
    assert _attempt(pair_dir, struct.pack("<Q", len(text)) + text.encode() + body) is None
