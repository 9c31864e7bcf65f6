"""`domerge merge` as a ratio of the I/O floor, measured side by side in one run.

Three real-shape SDXL kohya LoRAs (rank 32, both text encoders, LoCon rank 8 on the 3×3 convs,
fp16; ``benchmarks/synthetic.py``) are written once to ``--dir``. Then, alternating, each as a
whole process on one thread (``OMP_NUM_THREADS=1``; ``--threads`` to change it):

    floor    a plain-safetensors process: ``load_file`` each input, ``save_file`` all their tensors
             into one file (the same bytes a rank-Σr merge writes)
    <method> ``domerge merge <inputs> -o out --method <method> --overwrite``

and prints the median wall and CPU (user + system) time of each and their ratios to the floor's
(on a busy machine the CPU ratio is the steadier one). The output file of each run
is written in ``--dir`` (page cache warm for every contestant alike: each reads the same inputs).

    python benchmarks/speed/io_floor.py                        # do and ta, 3 rounds
    python benchmarks/speed/io_floor.py --methods do --rounds 5

``--baseline DIR`` adds ``<method>@base`` contestants: the same command run from another checkout
of the code (e.g. ``git -C . archive main domerge_core | tar -x -C /tmp/domerge_main``), in the
same alternating rounds, for a side-by-side before/after.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

FLOOR = r"""
import sys
from safetensors.torch import load_file, save_file
out = {}
for i, p in enumerate(sys.argv[2:]):
    for k, v in load_file(p).items():
        out[f"{i}.{k}"] = v
save_file(out, sys.argv[1])
"""


def timed(cmd, env, cwd=None):
    """(wall, CPU) seconds of one whole process; CPU = user + system of the child, which a busy
    machine inflates far less than the wall time."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=cwd)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/domerge_bench")
    ap.add_argument("--methods", default="do,ta")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout (a folder holding domerge_core/) to time beside this one")
    a = ap.parse_args()
    from benchmarks.synthetic import write_set

    paths = [os.path.abspath(p) for p in write_set(a.dir, model="sdxl", count=3, rank=32, te=True, conv_rank=8)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               DOMERGE_THREADS=str(a.threads))
    out = os.path.abspath(os.path.join(a.dir, "io_floor_out.safetensors"))
    domerge = [sys.executable, "-m", "domerge_core"]
    cmds = {"floor": ([sys.executable, "-c", FLOOR, out, *paths], None)}
    for m in a.methods.split(","):
        # run from the checkout's root: ``-m domerge_core`` imports the code there
        cmds[m] = ([*domerge, "merge", *paths, "-o", out, "--method", m, "--overwrite"], ROOT)
        if a.baseline:
            cmds[m + "@base"] = (cmds[m][0], os.path.abspath(a.baseline))
    times = {k: [] for k in cmds}
    for _ in range(a.rounds):
        for k, (cmd, cwd) in cmds.items():
            times[k].append(timed(cmd, env, cwd))
    size = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"three SDXL LoRAs r32 + TE + LoCon 8 ({size:.0f} MB in), {a.threads} thread(s), "
          f"median of {a.rounds} rounds")
    fw = statistics.median(t[0] for t in times["floor"])
    fc = statistics.median(t[1] for t in times["floor"])
    for k, ts in times.items():
        w = statistics.median(t[0] for t in ts)
        c = statistics.median(t[1] for t in ts)
        print(f"  {k:9s} wall {w:6.2f} s = {w / fw:4.2f}x   CPU {c:6.2f} s = {c / fc:4.2f}x the I/O floor   "
              f"(wall runs: {', '.join(f'{t[0]:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
