"""End-to-end speed of ``merge --method do`` on three real-shape SDXL kohya LoRAs (issue 3's "done when").

Three synthetic SDXL LoRAs, rank 32, with both text encoders (986 modules, fp16 factors, different
magnitudes: up scales 0.01 / 0.03 / 0.003), written once to ``--dir`` (default /tmp/domerge_bench)
by ``benchmarks/synthetic.py``. Then, on one thread by default:

    load     load_lora × 3 (header + lazy tensors)
    merge    domerge_core.merge(..., method) — split by the progress callback into
             orthogonalize / merge / truncate (time since the previous callback is credited to the
             stage being reported; reading the factors from the files is inside the first stage of
             each batch, and is also timed alone as "read factors (info)")
    write    MergeResult.save (kohya, fp16, atomic)

    python benchmarks/speed/bench_do_sdxl.py                   # do, then ta for comparison
    python benchmarks/speed/bench_do_sdxl.py --methods do --rank 64 --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def _inputs(folder: str, rank: int):
    from benchmarks.synthetic import write_set
    t = time.perf_counter()
    paths = write_set(folder, model="sdxl", count=3, rank=rank, te=True)
    return paths, time.perf_counter() - t


def run_once(paths, method, params, device, rank, energy, out_dir):
    from domerge_core.formats import load_lora
    from domerge_core import merge

    times = defaultdict(float)
    cpu = {}
    t0, c0 = time.perf_counter(), time.process_time()
    loras = [load_lora(p) for p in paths]
    times["load"] = time.perf_counter() - t0
    cpu["load"] = time.process_time() - c0

    last = [time.perf_counter()]

    def progress(done, total, stage):
        now = time.perf_counter()
        times[stage] += now - last[0]
        last[0] = now

    t1, c1 = time.perf_counter(), time.process_time()
    last[0] = t1
    res = merge(loras, method, params, device=device, rank=rank, energy=energy, progress=progress)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    times["merge (total)"] = time.perf_counter() - t1
    cpu["merge (total)"] = time.process_time() - c1
    times["report + assemble"] = time.perf_counter() - last[0]

    out = os.path.join(out_dir, f"merged_{method}.safetensors")
    t2, c2 = time.perf_counter(), time.process_time()
    res.save(out, dtype=torch.float16, overwrite=True)
    times["write"] = time.perf_counter() - t2
    cpu["write"] = time.process_time() - c2
    times["END TO END"] = time.perf_counter() - t0
    cpu["END TO END"] = time.process_time() - c0
    return res, times, cpu, os.path.getsize(out)


def read_factors_time(paths):
    from domerge_core.formats import load_lora
    t = time.perf_counter()
    for p in paths:
        for m in load_lora(p):
            m.scaled_factors(torch.float32)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "domerge_bench"))
    ap.add_argument("--methods", default="do,ta")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=None, help="truncate the output to this rank")
    ap.add_argument("--energy", type=float, default=None)
    ap.add_argument("--input-rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--param", action="append", default=[], help="method parameter name=value (repeatable)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    paths, t_gen = _inputs(a.dir, a.input_rank)
    print(f"inputs: {len(paths)} SDXL kohya LoRAs rank {a.input_rank} + TE in {a.dir} "
          f"({sum(os.path.getsize(p) for p in paths) / 1e6:.0f} MB; prepared in {t_gen:.1f} s)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {a.device}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall > CPU means a busy machine)")
    params = {}
    for kv in a.param:
        k, v = kv.split("=", 1)
        params[k] = v
    print(f"read factors (info): {read_factors_time(paths):.2f} s")
    for method in a.methods.split(","):
        best = None
        for _ in range(a.repeat):
            res, times, cpu, size = run_once(paths, method, params, a.device, a.rank, a.energy, a.dir)
            if best is None or times["END TO END"] < best[1]["END TO END"]:
                best = (res, times, cpu, size)
        res, times, cpu, size = best
        s = res.report["summary"]
        d = res.report["diagnostics"]
        print(f"\n== {method}  ({s['modules']} modules, out rank max {s['rank_max']}, "
              f"rel err max {s['rel_error_max']:.2e}, file {size / 1e6:.0f} MB)")
        for k in ("load", "orthogonalize", "merge", "truncate", "report + assemble", "merge (total)", "write",
                  "END TO END"):
            if k in times:
                extra = f"   (process CPU {cpu[k]:6.2f} s)" if k in cpu else ""
                print(f"  {k:20s} {times[k]:7.2f} s wall{extra}")
        print(f"  mean |cos| {d['mean_abs_cos_before']:.4f} -> {d['mean_abs_cos_after']:.4f}; "
              f"‖δA‖/‖A‖ mean {sum(l['rel_delta_A_mean'] for l in d['loras']) / len(d['loras']):.4f}")


if __name__ == "__main__":
    main()
