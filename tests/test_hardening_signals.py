"""Hardening, interruption (issue 6): SIGINT / SIGTERM sent to a CLI merge mid-run.

Inputs are real-shape: three SD1.5 kohya LoRAs with text encoder, rank 32 (module list from
diffusers' own UNet config, ``benchmarks/synthetic.py``; 264 modules, 38 MB each). The moment to
strike is not guessed from a timer: the CLI's stderr is a pseudo-terminal, so the CLI draws its
progress bar, and the test signals as soon as the bar shows the stage it wants (``orthogonalize``
or ``merge`` with work left); for the write stage it watches the output folder for the temp file.
No race with the merge: the runs set ``DOMERGE_PARK_AT=<stage>`` (`domerge_core.progress.checkpoint`),
so the process waits in that stage until the signal lands, however loaded the machine is.
After the signal: exit 130 / 143, one ``error:`` line, no traceback, no output, no temp file; an
existing output (``--overwrite``) survives byte for byte.
"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_hardening_support import PY, REPO, Run, file_bytes, server  # noqa: E402

torch.set_num_threads(1)
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
PARK = "DOMERGE_PARK_AT"
BAR = re.compile(r"\r\s*(\w+) \[[# ]*\] (\d+)/(\d+)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import synthetic

    d = tmp_path_factory.mktemp("real_shape")
    return synthetic.write_set(str(d), model="sd15", count=3, rank=32, te=True)


def _argv(inputs, target, method, *extra):
    return ["merge", *inputs, "-o", target, "--method", method, "--device", "cpu", *extra]


def _temp_files(folder):
    return [n for n in os.listdir(folder) if n != "merged.safetensors"]


def _check(run, sig, out, old=None):
    # files first: nothing partial, nothing left, nothing lost
    assert _temp_files(out) == [], f"temp files left: {_temp_files(out)}; stderr: {run.stderr[-500:]!r}"
    target = os.path.join(out, "merged.safetensors")
    if old is None:
        assert not os.path.exists(target), "partial output left"
    else:
        assert file_bytes(target) == old, "existing output changed"
    # then the message: exit code, no traceback, one error line that starts a line (on a terminal
    # the progress bar shares stderr, so the bar's line must be ended before the error)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.rc == EXIT[sig], f"rc {run.rc} after {sig.name}; stderr:\n{run.stderr}"
    lines = [l for l in re.split(r"[\r\n]", run.stderr) if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"error line not on a line of its own: {run.stderr[-300:]!r}"


def _read_until(master, pattern_ok, timeout):
    """Read the pty until ``pattern_ok(stage, done, total)``; returns (seen text, matched)."""
    buf = ""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        r, _, _ = select.select([master], [], [], 0.5)
        if not r:
            continue
        try:
            chunk = os.read(master, 65536).decode(errors="replace")
        except OSError:      # the child closed the terminal (it exited)
            return buf, False
        if not chunk:
            return buf, False
        buf += chunk
        for m in BAR.finditer(buf[-4096:]):
            if pattern_ok(m.group(1), int(m.group(2)), int(m.group(3))):
                return buf, True
    return buf, False


def _drain(master):
    out = ""
    while True:
        r, _, _ = select.select([master], [], [], 0.2)
        if not r:
            return out
        try:
            chunk = os.read(master, 65536).decode(errors="replace")
        except OSError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.mark.parametrize("sig,stage,existing", [
    (signal.SIGINT, "orthogonalize", False),
    (signal.SIGTERM, "merge", True),
], ids=["SIGINT-orthogonalize", "SIGTERM-merge-overwrite"])
def test_signal_mid_merge(inputs, tmp_path, sig, stage, existing):
    out = str(tmp_path)
    target = os.path.join(out, "merged.safetensors")
    old = None
    if existing:
        old = os.urandom(4096)
        with open(target, "wb") as f:
            f.write(old)
    master, slave = os.openpty()
    try:
        s = server()
        pid = s.start(_argv(inputs, target, "do", *(["--overwrite"] if existing else [])), cwd=out,
                      tty=os.ttyname(slave), env={PARK: stage})
        seen, hit = _read_until(master, lambda st, d, t: st == stage and 0 < d < t, 300)
        if hit:
            os.kill(pid, sig)
        seen += _drain(master)
        r = s.wait(120)
        seen += _drain(master)
    finally:
        os.close(slave)
        os.close(master)
    assert hit, f"never saw stage {stage!r} in progress; rc={r.rc}; terminal:\n{seen[-2000:]}"
    _check(Run(r.rc, r.stdout, seen), sig, out, old)


def _wait_for_temp(folder, alive, timeout):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if _temp_files(folder):
            return True
        if not alive():
            return False
        time.sleep(0.0005)
    return False


def _alive(pid):
    def check():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    return check


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_while_writing(inputs, tmp_path, sig):
    """The signal lands while the temp file is being written: the temp file goes away and the old
    output stays (the writer's own cleanup, not luck)."""
    out = str(tmp_path)
    target = os.path.join(out, "merged.safetensors")
    old = os.urandom(4096)
    with open(target, "wb") as f:
        f.write(old)
    s = server()
    pid = s.start(_argv(inputs, target, "ta", "--overwrite", "-q", "--dtype", "fp32"), cwd=out,
                  env={PARK: "write"})
    seen = _wait_for_temp(out, _alive(pid), 300)
    if seen:
        os.kill(pid, sig)
    r = s.wait(120)
    assert seen, f"never saw the temp file (rc {r.rc}): {r.stderr}"
    assert r.rc != 0, "the merge finished before the signal landed; the write stage was not hit"
    _check(r, sig, out, old)


def test_sigterm_fresh_process_while_writing(inputs, tmp_path):
    """The same through a genuinely fresh ``python -m domerge_core`` (no fork server)."""
    out = str(tmp_path)
    target = os.path.join(out, "merged.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{PARK: "write"},
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([PY, "-m", "domerge_core", *_argv(inputs, target, "ta", "-q", "--dtype", "fp32")],
                            cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _wait_for_temp(out, lambda: proc.poll() is None, 300)
        if seen:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen, f"never saw the temp file (rc {proc.returncode}): {stderr}"
    assert proc.returncode != 0, "the merge finished before the signal landed"
    _check(Run(proc.returncode, stdout, stderr), signal.SIGTERM, out)


def test_interrupt_right_after_the_temp_file_is_created(tmp_path):
    """Deterministic: Ctrl-C delivered at the first bytecode boundary after the temp file exists
    (where a real SIGINT lands when it arrives during ``mkstemp``). Python runs signal handlers
    exactly at such boundaries; a trace hook raises KeyboardInterrupt at that one."""
    import tempfile

    import domerge_core as dc
    from test_hardening_support import write_good

    inp = tmp_path / "in"
    out = tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    a = write_good(str(inp / "a.safetensors"), seed=1)
    b = write_good(str(inp / "b.safetensors"), seed=2)
    result = dc.merge([dc.load_lora(a), dc.load_lora(b)], method="ta", device="cpu")
    target = str(out / "merged.safetensors")

    def local(frame, event, arg):
        if event == "return":
            raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is tempfile.mkstemp.__code__:
            return local
        return None

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            result.save(target)
    finally:
        sys.settrace(None)
    assert os.listdir(out) == [], f"left behind: {os.listdir(out)}"


def test_sigterm_as_the_temp_file_appears_stress(tmp_path):
    """SIGTERM sent the instant the temp file shows up, 25 times on a small merge (each run is its
    own process): never a temp file left, never a partial output. Every fifth run waits in the
    write stage (``DOMERGE_PARK_AT``), so the signal surely lands mid-write at least there; the
    others race the writer on purpose."""
    from test_hardening_support import write_good

    a = write_good(str(tmp_path / "a.safetensors"), seed=1)
    b = write_good(str(tmp_path / "b.safetensors"), seed=2)
    s = server()
    outcomes = {}
    for i in range(25):
        out = tmp_path / f"o{i}"
        out.mkdir()
        target = str(out / "m.safetensors")
        pid = s.start(["merge", a, b, "-o", target, "--method", "ta", "-q"], cwd=str(out),
                      env={PARK: "write"} if i % 5 == 0 else None)
        while True:
            names = os.listdir(out)
            if names:
                break
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        r = s.wait(60)
        left = [n for n in os.listdir(out) if n != "m.safetensors"]
        assert not left, f"run {i}: temp file left {left}; rc {r.rc}; {r.stderr.strip()!r}"
        if os.path.exists(target):       # the rename won the race: the file must be whole
            from safetensors.torch import load_file
            assert load_file(target)
        outcomes[r.rc] = outcomes.get(r.rc, 0) + 1
    assert outcomes.get(143, 0) > 0, outcomes
