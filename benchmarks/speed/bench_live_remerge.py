"""How fast does a live strength-slider move re-merge? (notebook toolkit, issue 5)

Three real-shape synthetic SDXL LoRAs (UNet attention modules + both text encoders, rank 32, fp16,
kohya SGM names: 722 + 72 + 192 = 986 modules each; ``benchmarks/synthetic.py``) are written to /tmp once.
Then, for each method:

- ``cold``: the first merge through a fresh ``MergeCache`` (balanced forms, orthogonalization, ...);
- ``warm core``: ``domerge_core.merge`` again with other strengths and the warm cache — the work a
  slider move costs in the core;
- ``warm panel``: the same through the widget: a ``MergePanel`` (live mode, merging on this thread),
  a strength slider set, the debounce flushed; split into the core merge and the panel's rendering
  (diagnostics table + plots).

    python benchmarks/speed/bench_live_remerge.py [--methods do,ta] [--repeats 3] [--threads 1]

Prints a table; warm numbers are "median (min)" over ``--repeats`` slider moves. The panel shows
the numbers as soon as the merge is done and draws the plots after (a newer slider move skips
them), so "answer" = the merge, "with plots" = merge + table + redrawn plots; "CPU time" is the
process CPU time of the whole slider move (with one torch thread, what it takes on an idle core:
the wall times depend on how busy the machine is, and the load average is printed).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="do,ta")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/domerge_bench_live")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import domerge_core as core
    from domerge_widgets import MergePanel

    from benchmarks.synthetic import write_set

    t = time.perf_counter()
    paths = write_set(args.dir, model="sdxl", count=3, rank=args.rank, te=True)   # reused when present
    print(f"inputs ready in {time.perf_counter() - t:.1f} s")
    loras = [core.load_lora(p) for p in paths]
    print(f"inputs: {len(loras[0])} modules each, rank {args.rank}, {os.path.getsize(paths[0]) / 2**20:.0f} MiB each; "
          f"torch threads {torch.get_num_threads()}, device {args.device}")

    moves = [[0.8, 1.0, 1.0], [0.8, 0.6, 1.0], [0.8, 0.6, 1.3], [0.5, 0.6, 1.3], [0.5, 0.9, 1.3],
             [0.5, 0.9, 0.7], [1.1, 0.9, 0.7], [1.1, 0.4, 0.7]]
    rows: List[tuple] = []
    for method in args.methods.split(","):
        cache = core.MergeCache()
        t = time.perf_counter()
        core.merge(loras, method, weights=[1.0, 1.0, 1.0], device=args.device, cache=cache)
        cold = time.perf_counter() - t
        warm = []
        for w in moves[: args.repeats]:
            t = time.perf_counter()
            core.merge(loras, method, weights=w, device=args.device, cache=cache)
            warm.append(time.perf_counter() - t)
        del cache
        gc.collect()

        panel = MergePanel(loras=paths, method=method, device=args.device, live=True, background=False,
                           debounce=3600)
        panel.merge_button.click()
        if panel.last_error:
            raise SystemExit(f"panel merge failed: {panel.last_error}")
        cold_panel = panel.last_timing
        pm, pr, tot, cpu = [], [], [], []
        for w in moves[: args.repeats]:
            t = time.perf_counter()
            c = time.process_time()
            for row, v in zip(panel.rows, w):
                row.strength.value = v
            panel.debouncer.flush()
            tot.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            if panel.last_error:
                raise SystemExit(f"panel merge failed: {panel.last_error}")
            pm.append(panel.last_timing["merge_s"])
            pr.append(panel.last_timing["render_s"])
        rows.append((method, cold, _mm(warm), cold_panel["merge_s"] + cold_panel["render_s"], _mm(pm), _mm(tot),
                     _mm(cpu)))
        del panel
        gc.collect()

    print()
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| method | cold merge (core) | warm re-merge (core) | cold (panel) | slider move: answer | "
          "slider move: with plots | same, CPU time |")
    print("|---|---|---|---|---|---|---|")
    for m, c, w, cp, pm_, tot_, cpu_ in rows:
        print(f"| {m} | {c:.2f} s | {w} | {cp:.2f} s | {pm_} | {tot_} | {cpu_} |")


def _mm(xs: List[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f})"


if __name__ == "__main__":
    main()
