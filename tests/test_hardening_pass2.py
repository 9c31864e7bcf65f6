"""Hardening, second pass (issue 14): nothing lost, nothing hangs, nothing crashes.

Categories (each test names its own): 1 outputs (second outputs, sidecars, non-regular files,
no-replace publish), 2 inputs changing while read, 3 cost bounded by the file, 4 exit 2 / core
errors only, 5 usable files (modes, temp names, kill -9), 6 escaped names, 7 one reader (inspect
and merge agree), 8 same bytes for any thread count. CLI runs are forks of the warm server in
``test_hardening_support`` (a real process each: exit codes, signals, rlimits); the node side is in
``test_hardening_pass2_nodes.py``. No test depends on timing: costs are bounded by rlimits
(RLIMIT_CPU / RLIMIT_AS on the child, with wide margins) and by counting.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hardening_support import (PASS2_INPUTS, SD15, VICTIM, assert_one_error_line, file_bytes,  # noqa: E402
                                    kohya_tensors, listing, pass2_ids, raw_file, save, server, split_file,
                                    write_good, write_peft, META)

import domerge_core as dc  # noqa: E402
from domerge_core.formats import safetensors as st  # noqa: E402

torch.set_num_threads(1)


def _pair(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    a = write_good(str(inp / "a.safetensors"), seed=1)
    b = write_good(str(inp / "b.safetensors"), seed=2)
    return a, b, str(out)


def _snap(paths):
    return {p: file_bytes(p) for p in paths if os.path.isfile(p)}


def _unchanged(snap):
    for p, b in snap.items():
        assert file_bytes(p) == b, f"{p} changed"


# ============================================================================================
# the catalogue (categories 3, 4, 7): API, CLI merge, CLI inspect
# ============================================================================================
def _check_msg(case, msg):
    assert "\n" not in msg.strip(), msg
    if case.culprit:
        assert case.culprit in msg, f"{case.culprit!r} not in {msg!r}"
    if case.mention:
        assert any(m in msg for m in case.mention), f"none of {case.mention} in {msg!r}"


@pytest.mark.parametrize("case", PASS2_INPUTS, ids=pass2_ids())
def test_api_refuses_pass2(case, tmp_path):
    """Category 4: only DomergeError, naming the file (and key); category 7: describe (inspect)
    refuses the same file merge refuses."""
    paths = case.build(str(tmp_path))
    snap = _snap(paths)
    with pytest.raises(dc.DomergeError) as ei:
        loras = [dc.load_lora(p) for p in paths]
        dc.merge(loras, method="ta", device="cpu")
    _check_msg(case, str(ei.value))
    with pytest.raises(dc.DomergeError) as ei2:
        dc.describe(paths[-1])
    _check_msg(case, str(ei2.value))
    _unchanged(snap)


@pytest.mark.parametrize("case", PASS2_INPUTS, ids=pass2_ids())
def test_cli_merge_and_inspect_refuse_pass2(case, tmp_path):
    """Exit 2, one line naming the file, nothing written — for merge and for inspect alike."""
    paths = case.build(str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "m.safetensors")
    before, snap = listing(str(tmp_path), str(out)), _snap(paths)
    r = server().run(["merge", *paths, "-o", target], cwd=str(tmp_path))
    line = assert_one_error_line(r, *([case.culprit] if case.culprit else []))
    _check_msg(case, line)
    r = server().run(["inspect", paths[-1], "--no-analysis"], cwd=str(tmp_path))
    line = assert_one_error_line(r, *([case.culprit] if case.culprit else []))
    assert listing(str(tmp_path), str(out)) == before
    _unchanged(snap)


def test_inspect_and_merge_agree_on_integer_alphas(tmp_path):
    """Category 7, the accepting side: an alpha stored as an integer (I64/U8) reads the same in
    describe (header + plain read) and load_lora (tensor path)."""
    a = write_good(str(tmp_path / "a.safetensors"), seed=1)
    sd = kohya_tensors(SD15, seed=2)
    sd[VICTIM + ".alpha"] = torch.tensor(2, dtype=torch.int64)
    b = save(sd, str(tmp_path / "b.safetensors"), META["sd15"])
    d = dc.describe(b)
    lora = dc.load_lora(b)
    assert "2" in d["alphas"] and any(m.scale * m.rank == 2 for m in lora)
    dc.merge([a, b], method="ta", device="cpu")


# ============================================================================================
# category 1: every path written is checked against every input, sidecar, other output
# ============================================================================================
def test_report_equal_to_an_input_is_refused_even_with_overwrite(tmp_path):
    a, b, out = _pair(tmp_path)
    snap = _snap([a, b])
    target = os.path.join(out, "m.safetensors")
    r = server().run(["merge", a, b, "-o", target, "--report", a, "--overwrite", "-q"], cwd=str(tmp_path))
    assert_one_error_line(r, "a.safetensors")
    _unchanged(snap)
    assert os.listdir(out) == []


def test_report_equal_to_output_is_refused(tmp_path):
    a, b, out = _pair(tmp_path)
    target = os.path.join(out, "m.safetensors")
    r = server().run(["merge", a, b, "-o", target, "--report", target, "--overwrite", "-q"], cwd=str(tmp_path))
    assert_one_error_line(r, "m.safetensors")
    assert os.listdir(out) == []


def test_report_through_a_symlink_to_the_output_is_refused(tmp_path):
    a, b, out = _pair(tmp_path)
    target = os.path.join(out, "m.safetensors")
    os.symlink(target, os.path.join(out, "r.json"))
    r = server().run(["merge", a, b, "-o", target, "--report", os.path.join(out, "r.json"), "-q"],
                     cwd=str(tmp_path))
    assert_one_error_line(r)
    assert sorted(os.listdir(out)) == ["r.json"]


def test_report_equal_to_an_input_folders_adapter_config_is_refused(tmp_path):
    g = write_peft(str(tmp_path / "p1"), {"r": 4, "lora_alpha": 8}, seed=1)
    h = write_peft(str(tmp_path / "p2"), {"r": 4, "lora_alpha": 8}, seed=2)
    cfg = str(tmp_path / "p1" / "adapter_config.json")
    snap = _snap([g, h, cfg])
    out = str(tmp_path / "m.safetensors")
    r = server().run(["merge", str(tmp_path / "p1"), h, "-o", out, "--report", cfg, "--overwrite", "-q"],
                     cwd=str(tmp_path))
    assert_one_error_line(r, "adapter_config.json")
    _unchanged(snap)
    assert not os.path.exists(out)


def test_output_equal_to_an_inputs_adapter_config_is_refused(tmp_path):
    g = write_peft(str(tmp_path / "p1"), {"r": 4, "lora_alpha": 8}, seed=1)
    cfg = str(tmp_path / "p1" / "adapter_config.json")
    snap = _snap([g, cfg])
    r = server().run(["convert", g, "-o", cfg, "--overwrite"], cwd=str(tmp_path))
    assert_one_error_line(r, "adapter_config.json")
    _unchanged(snap)


def test_existing_report_is_refused_before_the_output_is_written(tmp_path):
    """Without --overwrite an existing report used to stop the run after the output was written,
    with a message saying nothing was."""
    a, b, out = _pair(tmp_path)
    rep = os.path.join(out, "r.json")
    open(rep, "w").write("{}")
    target = os.path.join(out, "m.safetensors")
    r = server().run(["merge", a, b, "-o", target, "--report", rep, "-q"], cwd=str(tmp_path))
    assert_one_error_line(r, "r.json")
    assert sorted(os.listdir(out)) == ["r.json"] and file_bytes(rep) == b"{}"


def test_report_failing_after_the_output_says_the_output_was_written(tmp_path):
    """If the report cannot be published (it appeared meanwhile), the message says the LoRA was
    written — never "nothing was written"."""
    a, b, out = _pair(tmp_path)
    target, rep = os.path.join(out, "m.safetensors"), os.path.join(out, "r.json")
    code = f"""
import sys
import domerge_core.cli as cli
orig = cli._write_json_atomic
def late(path, *a, **k):
    open({rep!r}, "w").write("{{}}")       # another process created it meanwhile
    return orig(path, *a, **k)
cli._write_json_atomic = late
sys.exit(cli.main(["merge", {a!r}, {b!r}, "-o", {target!r}, "--report", {rep!r}, "-q"]))
"""
    r = server().run(code=code, cwd=str(tmp_path))
    line = assert_one_error_line(r, "r.json")
    assert "was written to" in line and "nothing was written" not in line
    assert file_bytes(rep) == b"{}"
    assert dc.load_lora(target)


@pytest.mark.parametrize("kind", ["fifo", "devnull", "dangling", "hardlink to input", "symlink to input", "folder"])
@pytest.mark.parametrize("which", ["-o", "--report"])
def test_non_regular_or_input_outputs_are_refused(tmp_path, kind, which):
    a, b, out = _pair(tmp_path)
    bad = os.path.join(out, "x.out")
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "devnull":
        os.symlink("/dev/null", bad)
    elif kind == "dangling":
        os.symlink(bad + ".gone", bad)
    elif kind == "hardlink to input":
        os.link(a, bad)
    elif kind == "symlink to input":
        os.symlink(a, bad)
    else:
        os.mkdir(bad)
    snap = _snap([a, b])
    good = os.path.join(out, "good.out")
    argv = ["merge", a, b, "-q", "--overwrite"] + (["-o", bad, "--report", good] if which == "-o"
                                                   else ["-o", good, "--report", bad])
    r = server().run(argv, cwd=str(tmp_path))
    assert_one_error_line(r, "x.out")
    assert not os.path.exists(good)
    _unchanged(snap)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(bad).st_mode)


def test_demo_never_replaces_an_existing_file(tmp_path):
    """`domerge demo --out-dir` replaced demo_do.safetensors silently (overwrite=True)."""
    mine = tmp_path / "demo_do.safetensors"
    mine.write_bytes(b"my own file")
    r = server().run(["demo", "--out-dir", str(tmp_path)], cwd=str(tmp_path))
    assert_one_error_line(r, "demo_do.safetensors")
    assert mine.read_bytes() == b"my own file" and sorted(os.listdir(tmp_path)) == ["demo_do.safetensors"]


def test_api_save_refuses_sidecar_and_fifo(tmp_path):
    g = write_peft(str(tmp_path / "p1"), {"r": 4, "lora_alpha": 8}, seed=1)
    lora = dc.load_lora(g)
    with pytest.raises(dc.OutputExistsError):
        dc.save_lora(lora, str(tmp_path / "p1" / "adapter_config.json"), format="peft", overwrite=True)
    os.mkfifo(str(tmp_path / "f.safetensors"))
    with pytest.raises(dc.OutputExistsError):
        dc.save_lora(lora, str(tmp_path / "f.safetensors"), format="peft", overwrite=True)


def test_publish_never_replaces_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    """The check-then-rename race: a file created by someone else after the check and before the
    publish survives, and the writer reports it. Not overwriting, os.replace is never used (the
    publish is an atomic no-replace link), so no interleaving of two writers can let both win."""
    target = str(tmp_path / "t.bin")

    def write(f):
        f.write(b"mine")
        with open(target, "wb") as g:       # the other process wins the name now
            g.write(b"theirs")

    def no_replace(*a, **k):
        raise AssertionError("os.replace used without overwrite")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(dc.OutputExistsError):
        st.atomic_write(target, write)
    assert file_bytes(target) == b"theirs"
    assert os.listdir(tmp_path) == ["t.bin"]


def test_two_outputs_naming_one_file_are_refused():
    with pytest.raises(dc.OutputExistsError):
        st.check_outputs(["/tmp/x/../same.json", "/tmp/same.json"])


# ============================================================================================
# category 2: inputs that change while read
# ============================================================================================
_CHANGE = """
import hashlib, os, sys
import domerge_core as dc
from domerge_core.errors import DomergeError
a, b, out, mode = {a!r}, {b!r}, {out!r}, {mode!r}
la, lb = dc.load_lora(a), dc.load_lora(b)
next(iter(la)).factors()                   # a is open and partly read
blob = open(a, "rb").read()
if mode == "truncate":
    os.truncate(a, len(blob) // 2)
elif mode == "rewrite":                    # same size, other bytes, in place
    with open(a, "r+b") as f:
        f.seek(len(blob) - 64); f.write(bytes(64))
try:
    res = dc.merge([la, lb], method="ta", device="cpu")
    if mode == "replace":                  # another file renamed over a after the merge, before the save
        open(a + ".new", "wb").write(blob[:-64] + bytes(64)); os.replace(a + ".new", a)
    res.save(out)
except DomergeError as e:
    print("error:", e, file=sys.stderr); sys.exit(2)
"""


@pytest.mark.parametrize("mode", ["truncate", "rewrite"])
def test_input_changed_mid_merge_is_an_error_not_a_signal(tmp_path, mode):
    """Truncated (was SIGBUS through the mmap) or rewritten in place: exit 2 naming the file."""
    a, b, out = _pair(tmp_path)
    target = os.path.join(out, "m.safetensors")
    r = server().run(code=_CHANGE.format(a=a, b=b, out=target, mode=mode), cwd=str(tmp_path))
    line = assert_one_error_line(r, "a.safetensors")
    assert "changed while being read" in line
    assert not os.path.exists(target)


def test_recorded_sha256_is_that_of_the_bytes_merged(tmp_path):
    """An input replaced (renamed over) between the merge and the save: the metadata records the
    sha256 of the bytes merged (hashed through the descriptor they were read from) — not the new
    file's, which is what hashing the path at save time recorded."""
    a, b, out = _pair(tmp_path)
    original = hashlib.sha256(file_bytes(a)).hexdigest()
    target = os.path.join(out, "m.safetensors")
    r = server().run(code=_CHANGE.format(a=a, b=b, out=target, mode="replace"), cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    rec = json.loads(st.read_header(target).metadata["domerge"])
    assert rec["inputs"][0]["sha256"] == original != hashlib.sha256(file_bytes(a)).hexdigest()
    # the merged values are those of the original a (compare with a merge of a pristine copy)
    ref_a = str(tmp_path / "ref_a.safetensors")
    write_good(ref_a, seed=1)
    ref = dc.merge([ref_a, b], method="ta", device="cpu").lora
    got = dc.load_lora(target)
    k = next(iter(ref.modules))
    assert torch.allclose(ref[k].delta(), got[k].delta(), atol=1e-3)


def test_input_replaced_between_load_and_read_is_named(tmp_path):
    a, b, out = _pair(tmp_path)
    la = dc.load_lora(a)
    write_good(a + ".new", seed=5)
    os.replace(a + ".new", a)
    with pytest.raises(dc.LoraFormatError, match="changed") as ei:
        next(iter(la)).factors()
    assert "a.safetensors" in str(ei.value)


# ============================================================================================
# category 3: cost bounded by the file
# ============================================================================================
def _many_tensors(path, n):
    header = {f"t{i}": {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]} for i in range(n)}
    with open(path, "wb") as f:
        f.write(raw_file(header, bytes(2 * n)))


@pytest.mark.parametrize("cmd", ["inspect", "merge"])
def test_a_file_of_too_many_tensors_is_refused_cheaply(tmp_path, cmd):
    """70,000 one-element tensors (the issue's file had 1,000,002): refused by count while parsing,
    inside 20 CPU-seconds and 400 MiB more address space (the old reader needed ~10 bytes of memory
    per header byte and seconds per 10k tensors in merge)."""
    bad = str(tmp_path / "many.safetensors")
    _many_tensors(bad, 70_000)
    g = write_good(str(tmp_path / "g.safetensors"))
    argv = ["inspect", bad, "--no-analysis"] if cmd == "inspect" else ["merge", g, bad, "-o",
                                                                       str(tmp_path / "m.safetensors")]
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_CPU, (20, 20))\n"
            f"from domerge_core.cli import main\nsys.exit(main({argv!r}))\n")
    r = server().run(code=code, cwd=str(tmp_path), as_extra=400 << 20)
    line = assert_one_error_line(r, "many.safetensors")
    assert "more than 65,536 tensors" in line


def test_tensor_count_is_bounded_while_parsing():
    """Structure: the JSON hook stops the parse once the bound is passed (entries past it are never
    built), so the cost of a header is bounded by the count, not by what the file declares."""
    seen = []
    text = "{" + ",".join(f'"t{i}":{{"i":{i}}}' for i in range(1000)) + "}"
    orig = st._parse_int
    try:
        st._parse_int = lambda x: (seen.append(x), orig(x))[1]
        with pytest.raises(ValueError, match="more than 10"):
            st.safe_json_loads(text, max_objects=10)
    finally:
        st._parse_int = orig
    assert len(seen) <= 11


def test_sparse_file_is_refused_before_allocating(tmp_path):
    """A few KB on disk declaring a 4 GiB tensor: refused as sparse, under +512 MiB address space."""
    bad = str(tmp_path / "sparse.safetensors")
    n = 1 << 31                                   # fp16 elements of the down factor: 4 GiB of holes
    up_bytes = 320 * 128 * 2
    header = {VICTIM + ".lora_down.weight": {"dtype": "F16", "shape": [128, n >> 7], "data_offsets": [0, 2 * n]},
              VICTIM + ".lora_up.weight": {"dtype": "F16", "shape": [320, 128],
                                           "data_offsets": [2 * n, 2 * n + up_bytes]},
              VICTIM + ".alpha": {"dtype": "F32", "shape": [], "data_offsets": [2 * n + up_bytes, 2 * n + up_bytes + 4]}}
    head = raw_file(header, b"")
    with open(bad, "wb") as f:
        f.write(head)
        f.seek(len(head) + 2 * n)
        f.write(bytes(up_bytes) + struct.pack("<f", 128.0))
    if os.stat(bad).st_blocks * 512 > 1 << 20:
        pytest.skip("this filesystem does not make sparse files")
    for argv in (["inspect", bad, "--no-analysis"], ["convert", bad, "-o", str(tmp_path / "o.safetensors")]):
        r = server().run(argv, cwd=str(tmp_path), as_extra=512 << 20)
        line = assert_one_error_line(r, "sparse.safetensors")
        assert "is a sparse file" in line


def test_a_backtracking_alpha_pattern_does_not_hang(tmp_path):
    """A pattern from the file's own metadata that takes Python's re ~forever on these module
    names is matched in linear time: inspect and merge finish inside 30 CPU-seconds, with the
    pattern's alpha applied where PEFT would apply it."""
    mods = [f"model.layers.{i}.{'a' * 40}.q_proj" for i in range(2)]
    pat = "a*" * 14 + "c"                          # never matches: re explores ~C(54,14) paths
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "alpha_pattern": {pat: 2, "q_proj": 16}})}
    p1 = write_peft(str(tmp_path / "x"), None, seed=1, metadata=meta, name="one.safetensors", modules=mods)
    p2 = write_peft(str(tmp_path / "x"), None, seed=2, metadata=meta, name="two.safetensors", modules=mods)
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_CPU, (30, 30))\n"
            "from domerge_core.cli import main\n"
            f"rc = main(['inspect', {p1!r}, '--json', '--no-analysis'])\n"
            f"sys.exit(rc or main(['merge', {p1!r}, {p2!r}, '-o', {str(tmp_path / 'm.safetensors')!r}, '-q']))\n")
    r = server().run(code=code, cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["alphas"] == {"16": 2}


@pytest.mark.parametrize("pattern,path,expected", [
    ("q_proj", "model.layers.0.q_proj", True), ("layers.0.q_proj", "model.layers.0.q_proj", True),
    ("q_proj", "model.layers.0.xq_proj", False), (".*attn.*", "x.attn1.to_k", True),
    ("to_[qk]|v", "x.to_k", True), ("at+n1", "x.attn1", True), ("x.at?tn1", "x.atn1", True),
    ("b*c", "a.c", True), ("b*c", "ac", False), ("q*", "x.", True), ("q+", "x.", False),
    (r"layers\.\d\.q_proj", "m.layers.3.q_proj", True), ("[^.]+", "a.b", True), ("to_q$", "a.to_q", True),
])
def test_pattern_matcher_agrees_with_peft_semantics(pattern, path, expected):
    import re
    from domerge_core.formats.plan import _Pattern
    assert (re.match(rf"(.*\.)?({pattern})$", path) is not None) == expected
    assert _Pattern(pattern).match(path) == expected


# ============================================================================================
# category 4: exit 2 (CLI) and DomergeError only (API)
# ============================================================================================
@pytest.mark.parametrize("extra,word", [
    (["--rank", str(2 ** 63)], "--rank"), (["--rank", str(2 ** 31)], "--rank"), (["--seed", str(2 ** 63)], "--seed"),
    (["--seed", "-1"], "--seed"), (["--seed", "9" * 5000], "--seed"), (["--weights", "1e400,1"], "--weights"),
])
def test_cli_out_of_range_numbers(tmp_path, extra, word):
    a, b, out = _pair(tmp_path)
    target = os.path.join(out, "m.safetensors")
    r = server().run(["merge", a, b, "-o", target, "-q", *extra], cwd=str(tmp_path))
    assert r.rc == 2 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert os.listdir(out) == []


@pytest.fixture()
def pair(tmp_path):
    a = write_good(str(tmp_path / "a.safetensors"), seed=1)
    b = write_good(str(tmp_path / "b.safetensors"), seed=2)
    return [dc.load_lora(a), dc.load_lora(b)]


@pytest.mark.parametrize("kw", [
    dict(weights="0.5,1"), dict(weights=5), dict(weights=[1, "x"]),
    dict(weights=[1, 10 ** 400]), dict(weights=[1.0, None]), dict(rank=float("nan")), dict(rank=float("inf")),
    dict(rank="four"), dict(rank=2 ** 63), dict(rank=True), dict(energy="half"), dict(seed=-1), dict(seed=2 ** 63),
    dict(seed=1.5), dict(seed="1"), dict(params=[("lam", 1.0)]), dict(params={"lam": 10 ** 400}),
    dict(params={"lam": "x"}), dict(params={"lam": float("inf")}), dict(method=["ties"]),
    dict(method="ties", params={"density": [0.5]}),
], ids=lambda kw: ",".join(f"{k}={str(v)[:12]}" for k, v in kw.items()))
def test_api_bad_arguments_raise_core_errors_only(pair, kw):
    kw = dict(kw)
    method = kw.pop("method", "ta")
    with pytest.raises(dc.DomergeError):
        dc.merge(pair, method=method, device="cpu", **kw)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.uint8, "fp16", torch.complex64])
def test_api_never_writes_a_file_its_reader_refuses(pair, tmp_path, dtype):
    res = dc.merge(pair, method="ta", device="cpu")
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(dc.DomergeError):
        res.save(out, dtype=dtype)
    with pytest.raises(dc.DomergeError):
        dc.save_lora(pair[0], out, dtype=dtype)
    assert not os.path.exists(out)


# ============================================================================================
# category 5: files people can use
# ============================================================================================
@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_new_output_mode_follows_the_umask(pair, tmp_path, umask):
    old = os.umask(umask)
    try:
        path = dc.save_lora(pair[0], str(tmp_path / "o.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("mode", [0o664, 0o640, 0o600])
def test_overwrite_keeps_the_existing_mode(pair, tmp_path, mode):
    path = str(tmp_path / "o.safetensors")
    open(path, "wb").write(b"old")
    os.chmod(path, mode)
    dc.save_lora(pair[0], path, overwrite=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode and file_bytes(path) != b"old"


def test_cli_output_mode_follows_the_umask(tmp_path):
    a, b, out = _pair(tmp_path)
    target, rep = os.path.join(out, "m.safetensors"), os.path.join(out, "r.json")
    code = (f"import os, sys\nos.umask(0o002)\nfrom domerge_core.cli import main\n"
            f"sys.exit(main(['merge', {a!r}, {b!r}, '-o', {target!r}, '--report', {rep!r}, '-q']))\n")
    r = server().run(code=code, cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o664 == stat.S_IMODE(os.stat(rep).st_mode)


def test_longest_names_can_be_written(pair, tmp_path):
    """233-255-byte names used to fail: the temp name was the output name plus a suffix."""
    for n in (233, 255):
        name = "x" * (n - len(".safetensors")) + ".safetensors"
        path = dc.save_lora(pair[0], str(tmp_path / name))
        assert os.path.basename(path) == name and dc.load_lora(path)


def test_kill_9_mid_write_leaves_a_temp_the_next_run_removes(tmp_path):
    a, b, out = _pair(tmp_path)
    target = os.path.join(out, "m.safetensors")
    code = f"""
import os, signal, sys
import domerge_core.formats.safetensors as st
orig = st.write_safetensors
def die(f, *a, **k):
    f.write(b"partial"); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
st.write_safetensors = die
from domerge_core.cli import main
sys.exit(main(["merge", {a!r}, {b!r}, "-o", {target!r}, "-q"]))
"""
    r = server().run(code=code, cwd=str(tmp_path))
    assert r.rc == -signal.SIGKILL
    left = os.listdir(out)
    assert len(left) == 1 and st.TEMP_RE.match(left[0]) and not os.path.exists(target)
    # a live process's temp file (this one's) is never touched
    mine = os.path.join(out, f".domerge-{st._HOST}-{os.getpid()}-0123abcd.x.tmp")
    open(mine, "w").close()
    r = server().run(["merge", a, b, "-o", target, "-q"], cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted([os.path.basename(mine), "m.safetensors"])


# ============================================================================================
# category 6: the terminal is not the file's
# ============================================================================================
FORGE = "bad\nerror: all is fine\x1b[2J\x1b]0;title\x07.safetensors"


def test_file_names_are_escaped_in_errors(tmp_path):
    bad = str(tmp_path / FORGE)
    open(bad, "wb").write(b"not a safetensors file at all")
    g = write_good(str(tmp_path / "g.safetensors"))
    for argv in (["merge", g, bad, "-o", str(tmp_path / "m.safetensors")], ["inspect", bad]):
        r = server().run(argv, cwd=str(tmp_path))
        line = assert_one_error_line(r)
        assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\\n" in line and "\\x1b" in line


def test_tensor_names_are_escaped_in_errors_and_inspect(tmp_path):
    name = "lora_unet_x\nerror: forged\x1b[31m"
    sd = kohya_tensors(SD15, seed=2)
    sd[name + ".lora_down.weight"] = torch.zeros(4, 8, dtype=torch.float16)
    sd[name + ".lora_up.weight"] = torch.zeros(8, 5, dtype=torch.float16)    # rank mismatch: refused
    bad = save(sd, str(tmp_path / "bad.safetensors"))
    r = server().run(["inspect", bad], cwd=str(tmp_path))
    line = assert_one_error_line(r, "bad.safetensors")
    assert "\x1b" not in r.stderr
    good_name = str(tmp_path / "good\x1b[2J.safetensors")
    write_good(good_name)
    r = server().run(["inspect", good_name], cwd=str(tmp_path))
    assert r.rc == 0 and "\x1b" not in r.stdout and "\\x1b[2J" in r.stdout, r.stdout
    assert line.startswith("error: ")


def test_names_are_escaped_in_the_analysis_and_the_merge_summary(tmp_path):
    a = write_good(str(tmp_path / "a\x1b[2J.safetensors"), seed=1)
    b = write_good(str(tmp_path / "b\nforged.safetensors"), seed=2)
    r = server().run(["inspect", a, b], cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    assert "\x1b" not in r.stdout and "a\\x1b[2J.safetensors" in r.stdout and "b\\nforged" in r.stdout
    assert "pairwise analysis" in r.stdout.splitlines()       # still one line per row
    out = str(tmp_path / "m\x1b[31m.safetensors")
    r = server().run(["merge", a, b, "-o", out], cwd=str(tmp_path))
    assert r.rc == 0, r.stderr
    assert "\x1b" not in r.stdout and "m\\x1b[31m.safetensors" in r.stdout


def test_core_errors_are_one_escaped_line():
    e = dc.LoraFormatError("bad\u2028thing\n", file="a\nb\x1b", key="k\r")
    s = str(e)
    assert "\n" not in s and "\x1b" not in s and "\u2028" not in s and "\r" not in s


# ============================================================================================
# category 8: same bytes everywhere
# ============================================================================================
@pytest.mark.parametrize("method", ["ties", "dare"])
def test_dense_methods_give_the_same_bytes_with_1_and_2_threads(tmp_path, method):
    a = write_good(str(tmp_path / "a.safetensors"), seed=1)
    b = write_good(str(tmp_path / "b.safetensors"), seed=2)
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            p = dc.merge([a, b], method=method, device="cpu").save(str(tmp_path / f"{n}.safetensors"))
        finally:
            torch.set_num_threads(1)
        outs.append(file_bytes(p))
    assert outs[0] == outs[1]
