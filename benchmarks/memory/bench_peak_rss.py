"""Peak memory of a CLI merge of three real-shape SDXL LoRAs (issue 6, "bounded memory").

Three synthetic kohya SDXL LoRAs with both text encoders, rank 32, fp16 (``benchmarks/synthetic.py``:
986 modules each, module shapes from diffusers' own SDXL UNet config) are written once to
``--dir``. Each method then runs as ``python -m domerge_core merge ... --device cpu`` in its own
subprocess; its peak resident set (``ru_maxrss`` from ``os.wait4`` on that very process) is
compared with the bytes on disk, inputs + output. Target: peak RSS < 2 × (inputs + output).

A baseline process that only imports torch and ``domerge_core`` (what any run pays before reading
a byte) is measured too and shown, so the ratio can be read with and without the interpreter.

    python benchmarks/memory/bench_peak_rss.py [--methods do,ta] [--rank 64] [--dir /tmp/domerge-mem] [--profile]

Prints a table (and ``--json FILE`` writes the numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MB = 1024 * 1024


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DOMERGE_DEBUG", None)
    return env


def run_measured(argv, cwd):
    """(return code, peak RSS bytes, seconds, stderr) of one child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return proc.returncode, peak, time.perf_counter() - t0, text


_PROFILE = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
import domerge_core as dc

def rss():
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            d[k] = int((v.split() or ["0"])[0]) if k in ("VmRSS", "VmHWM", "RssFile", "RssAnon") else 0
    return {"rss": d["VmRSS"] / 1024, "file": d["RssFile"] / 1024, "anon": d["RssAnon"] / 1024,
            "peak": d["VmHWM"] / 1024}

paths, out, method = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
rows = [("imported", rss())]
loras = [dc.load_lora(p) for p in paths]
rows.append(("loaded (lazy)", rss()))
res = dc.merge(loras, method=method, device="cpu")
rows.append(("merged", rss()))
sd, md = res.state_dict()
rows.append(("state_dict built", rss()))
del sd
res.save(out)
rows.append(("saved", rss()))
os.remove(out)
print(json.dumps(rows))
"""


def profile_stages(paths, out_dir, method):
    """RSS after each stage of an in-process merge (Linux /proc): where the peak comes from."""
    out = os.path.join(out_dir, f"profile_{method}.safetensors")
    if os.path.exists(out):
        os.remove(out)
    r = subprocess.run([sys.executable, "-c", _PROFILE, *paths, out, method], env=_env(), capture_output=True,
                       text=True)
    if r.returncode != 0:
        print(r.stderr[-2000:])
        return
    print(f"\nstages of an in-process {method} merge (MB; file = mapped file pages, anon = heap):")
    print(f"{'stage':<18s}{'RSS':>8s}{'file':>8s}{'anon':>8s}{'peak':>8s}")
    for name, d in json.loads(r.stdout.strip().splitlines()[-1]):
        print(f"{name:<18s}{d['rss']:>8.0f}{d['file']:>8.0f}{d['anon']:>8.0f}{d['peak']:>8.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "domerge-mem"),
                    help="where the inputs are written once and reused")
    ap.add_argument("--methods", default="do,ta")
    ap.add_argument("--model", default="sdxl", choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--rank", type=int, default=None, help="output rank (default: the method's own)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also show RSS after each stage of an in-process merge (Linux)")
    a = ap.parse_args()

    sys.path.insert(0, os.path.dirname(HERE))
    import torch
    torch.set_num_threads(1)
    import synthetic

    t0 = time.perf_counter()
    paths = synthetic.write_set(a.dir, model=a.model, count=a.count, rank=a.lora_rank, te=True)
    print(f"inputs: {len(paths)} x {a.model} rank {a.lora_rank} (+te) in {a.dir} "
          f"(ready in {time.perf_counter() - t0:.1f} s)")
    in_bytes = sum(os.path.getsize(p) for p in paths)

    rc, base_peak, base_t, err = run_measured(
        [sys.executable, "-c", "import torch, domerge_core, domerge_core.cli; torch.set_num_threads(1); "
         "[getattr(domerge_core, n) for n in ('merge', 'load_lora', 'save_lora', 'check_compatible')]"], ROOT)
    if rc != 0:
        print(err)
        return 1

    rows = []
    for method in [m for m in a.methods.split(",") if m]:
        out = os.path.join(a.dir, f"merged_{method}.safetensors")
        if os.path.exists(out):
            os.remove(out)
        argv = [sys.executable, "-m", "domerge_core", "merge", *paths, "-o", out, "--method", method,
                "--device", "cpu", "-q"] + (["--rank", str(a.rank)] if a.rank else [])
        rc, peak, secs, err = run_measured(argv, a.dir)
        if rc != 0:
            print(f"{method}: exit {rc}\n{err}")
            rows.append(dict(method=method, rc=rc, error=err.strip().splitlines()[-1:] or [""]))
            continue
        out_bytes = os.path.getsize(out)
        disk = in_bytes + out_bytes
        rows.append(dict(method=method, rc=0, inputs_mb=in_bytes / MB, output_mb=out_bytes / MB,
                         peak_rss_mb=peak / MB, baseline_mb=base_peak / MB, seconds=secs,
                         ratio=peak / disk, ratio_net=(peak - base_peak) / disk, ok=peak < 2 * disk,
                         command=" ".join(["python"] + argv[1:])))
        os.remove(out)

    print(f"\nbaseline (python + torch + domerge_core imported): {base_peak / MB:.0f} MB peak RSS\n")
    hdr = f"{'method':<8s}{'inputs MB':>11s}{'output MB':>11s}{'in+out MB':>11s}{'peak RSS MB':>13s}" \
          f"{'RSS/(in+out)':>14s}{'net of base':>13s}{'time s':>9s}  target <2x"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["rc"] != 0:
            print(f"{r['method']:<8s}  failed: {r['error']}")
            continue
        print(f"{r['method']:<8s}{r['inputs_mb']:>11.0f}{r['output_mb']:>11.0f}{r['inputs_mb'] + r['output_mb']:>11.0f}"
              f"{r['peak_rss_mb']:>13.0f}{r['ratio']:>14.2f}{r['ratio_net']:>13.2f}{r['seconds']:>9.1f}  "
              f"{'PASS' if r['ok'] else 'FAIL'}")
    if rows:
        print(f"\ncommand: {rows[0].get('command', '')}")
    if a.profile:
        profile_stages(paths, a.dir, [m for m in a.methods.split(",") if m][-1])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(baseline_mb=base_peak / MB, rows=rows), f, indent=2)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
