"""Speed of merges whose inputs include LyCORIS LoHa / LoKr, beside the same merge of plain LoRAs.

Real module shapes (``benchmarks/synthetic.py``), factors in fp16 held in memory as loaded files:

- ``plain``: three kohya LoRAs, rank 32;
- ``lycoris``: one kohya LoRA rank 32, one LoHa (``hada`` ranks 8 × 8: an exact rank-64 module), one LoKr
  (factor 8: whole 8×8 ``lokr_w1`` ⊗ rank-8 ``lokr_w2_a/b``: an exact rank-64 module);
- ``plain64``: the same kohya LoRA rank 32 and two plain LoRAs of rank 64 (the LoHa/LoKr exact ranks).

Each merge runs ``ta`` and ``do`` at output rank 32 on one CPU thread; printed: wall and CPU time of the
merge (reading the factors included; CPU time is the robust one on a shared machine), and the time to build every module's (up, down) without merging
(the LoHa/LoKr reading cost: face-splitting / Khatri–Rao / Kronecker products of the stored factors).

    OMP_NUM_THREADS=1 python benchmarks/speed/bench_lycoris.py --model sd15 --te
    OMP_NUM_THREADS=1 python benchmarks/speed/bench_lycoris.py --model sdxl --te
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.synthetic import module_list, synthetic_kohya  # noqa: E402
from domerge_core import load_state_dict, merge  # noqa: E402


def _rnd(g, *s, scale=1.0):
    return (torch.randn(*s, generator=g) * scale).half()


def loha_sd(mods, r=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in mods.items():
        m, n = shape[0], shape[1]
        sd.update({name + ".hada_w1_a": _rnd(g, m, r, scale=0.1), name + ".hada_w1_b": _rnd(g, r, n, scale=n ** -0.5),
                   name + ".hada_w2_a": _rnd(g, m, r, scale=0.1), name + ".hada_w2_b": _rnd(g, r, n, scale=n ** -0.5),
                   name + ".alpha": torch.tensor(float(r)).half()})
    return sd


def lokr_sd(mods, f=8, r=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in mods.items():
        m, n = shape[0], shape[1]
        a = f if m % f == 0 else 1
        b = f if n % f == 0 else 1
        sd.update({name + ".lokr_w1": _rnd(g, a, b),
                   name + ".lokr_w2_a": _rnd(g, m // a, r, scale=0.1),
                   name + ".lokr_w2_b": _rnd(g, r, n // b, scale=(n // b) ** -0.5),
                   name + ".alpha": torch.tensor(float(r)).half()})
    return sd


def build(model, te):
    mods = module_list(model, te=te)
    mods = {k: v for k, v in mods.items() if len(v) == 2}          # linear modules (kohya LoRA default)
    plain = []
    for s in range(3):
        sd, meta = synthetic_kohya(model, rank=32, te=te, seed=10 + s, modules=mods)
        plain.append(load_state_dict(sd, source=f"plain{s}.safetensors", metadata=meta))
    _, meta = synthetic_kohya(model, rank=32, te=te, seed=10, modules={})
    lyco = [plain[0], load_state_dict(loha_sd(mods), source="loha.safetensors", metadata=meta),
            load_state_dict(lokr_sd(mods), source="lokr.safetensors", metadata=meta)]
    same = [plain[0]]
    for s in range(2):      # plain LoRAs of the LoHa/LoKr inputs' exact rank (64)
        sd, meta = synthetic_kohya(model, rank=64, te=te, seed=20 + s, modules=mods)
        same.append(load_state_dict(sd, source=f"plain64_{s}.safetensors", metadata=meta))
    return plain, lyco, same


def read_all(loras):
    t = time.perf_counter()
    for lo in loras:
        for m in lo:
            m.factors(torch.float32)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--te", action="store_true")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--methods", default="ta,do")
    args = ap.parse_args()
    torch.set_num_threads(1)
    plain, lyco, same = build(args.model, args.te)
    print(f"model {args.model}{' + TE' if args.te else ''}: {len(plain[0])} modules; input ranks plain "
          f"{[next(iter(x)).rank for x in plain]}, lycoris {[next(iter(x)).rank for x in lyco]}")
    print(f"read factors of all modules: plain {read_all(plain):.2f} s, lycoris {read_all(lyco):.2f} s, "
          f"plain64 {read_all(same):.2f} s")
    for method in args.methods.split(","):
        for label, inputs in (("plain", plain), ("lycoris", lyco), ("plain64", same)):
            t, c = time.perf_counter(), time.process_time()
            merge(inputs, method, weights=[1.0, 0.7, 0.5], rank=args.rank, device="cpu")
            print(f"{method:3s} {label:8s} merge at rank {args.rank}: wall {time.perf_counter() - t:.2f} s, "
                  f"CPU {time.process_time() - c:.2f} s")


if __name__ == "__main__":
    main()
