"""Pre-train the backbone and train one LoRA + head per task; everything cached as safetensors.

Cache layout (``benchmarks/quality/cache/``, gitignored)::

    seed<S>/backbone.safetensors            backbone state dict (+ "pretrain_head.*")
    seed<S>/<variant>/<task>.safetensors    PEFT-layout LoRA: base_model.model.<path>.lora_A.weight
                                            (r×in), ...lora_B.weight (out×r), plus head.weight/bias;
                                            metadata: rank, lora_alpha, lr, steps, task, variant

Two LoRA *variants* per task and seed:
- ``hetero``: the benchmark's main set. Ranks, alphas and learning rates deliberately differ
  between tasks (8 configs, assigned to tasks by a seed-dependent permutation), so the update
  magnitudes differ the way community LoRAs do.
- ``uniform``: every task trained the same way (rank 4, alpha 4, lr 1e-3). Mixing the two
  variants gives LoRA sets whose magnitude variance ranges from low to high (the
  magnitude-variance study in run.py).

Run ``python benchmarks/quality/train.py`` (idempotent: existing files are kept unless --force).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from safetensors.torch import load_file, save_file, safe_open  # noqa: E402

import data as D  # noqa: E402
from model import KEY_PREFIX, DigitViT  # noqa: E402

CACHE = os.path.join(HERE, "cache")
CACHE_VERSION = "2"
MODEL_KW = dict(d=64, depth=2, heads=4, mlp=128)
SEEDS = (0, 1, 2)
VARIANTS = ("hetero", "uniform")

PRETRAIN_STEPS = 1200
LORA_STEPS = 300
BATCH = 64
HEAD_LR = 3e-3

# (rank, lora_alpha, lr): scale alpha/rank from 0.25 to 2, lr from 3e-4 to 5e-3, ranks 1..8
# (Σ ranks = 33 < d = 64, as on real models where T·r is well below the width)
HETERO_CONFIGS: Tuple[Tuple[int, float, float], ...] = (
    (1, 1.0, 3e-3), (2, 0.5, 2e-3), (2, 4.0, 5e-4), (4, 4.0, 1e-3),
    (4, 8.0, 2e-3), (8, 4.0, 3e-4), (8, 16.0, 1e-3), (4, 2.0, 5e-3),
)
UNIFORM_CONFIG: Tuple[int, float, float] = (4, 4.0, 1e-3)


def lora_config(seed: int, variant: str, task: str) -> Tuple[int, float, float]:
    if variant == "uniform":
        return UNIFORM_CONFIG
    perm = torch.randperm(len(HETERO_CONFIGS), generator=torch.Generator().manual_seed(500 + seed)).tolist()
    return HETERO_CONFIGS[perm[D.TASKS.index(task)]]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random ±1 pixel translation (pre-training augmentation)."""
    dx, dy = (torch.randint(-1, 2, (2,), generator=g)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(1, 2))


def _batches(n: int, steps: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + BATCH]
        pos += BATCH


def accuracy(model: DigitViT, head: torch.nn.Linear, td: D.TaskData) -> float:
    model.eval()
    with torch.no_grad():
        return (head(model(td.x)).argmax(-1) == td.y).float().mean().item()


def pretrain(seed: int, tasks: Dict[str, Dict[str, D.TaskData]]) -> Tuple[DigitViT, torch.nn.Linear]:
    torch.manual_seed(seed)
    model = DigitViT(**MODEL_KW)
    head = torch.nn.Linear(model.d, D.NUM_CLASSES["pretrain"])
    tr = tasks["pretrain"]["train"]
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=PRETRAIN_STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for idx in _batches(len(tr.y), PRETRAIN_STEPS, g):
        loss = torch.nn.functional.cross_entropy(head(model(_shift(tr.x[idx], g))), tr.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, head


def train_lora(model: DigitViT, task: str, td: Dict[str, D.TaskData], rank: int, alpha: float, lr: float,
               seed: int) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], torch.nn.Linear]:
    """Returns ({key: (B, A)}, head). The backbone stays frozen."""
    g = torch.Generator().manual_seed(1000 * seed + D.TASKS.index(task))
    model.clear_adapters()
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in model.adapt_layers():
        layer.add_lora(rank, alpha / rank, g)
    head = torch.nn.Linear(model.d, D.NUM_CLASSES[task])
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)
        head.bias.zero_()
    lora_params = [p for _, l in model.adapt_layers() for p in (l.lora_A, l.lora_B)]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": lr, "weight_decay": 0.0},
                             {"params": head.parameters(), "lr": HEAD_LR, "weight_decay": 0.0}])
    tr = td["train"]
    model.train()
    for idx in _batches(len(tr.y), LORA_STEPS, g):
        loss = torch.nn.functional.cross_entropy(head(model(tr.x[idx])), tr.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    factors = {k: (l.lora_B.detach().clone(), l.lora_A.detach().clone()) for k, l in model.adapt_layers()}
    model.clear_adapters()
    return factors, head


def backbone_path(seed: int) -> str:
    return os.path.join(CACHE, f"seed{seed}", "backbone.safetensors")


def lora_path(seed: int, variant: str, task: str) -> str:
    return os.path.join(CACHE, f"seed{seed}", variant, f"{task}.safetensors")


def _save(tensors: Dict[str, torch.Tensor], meta: Dict[str, str], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def save_lora(path: str, factors, head: torch.nn.Linear, meta: Dict[str, str]) -> None:
    t: Dict[str, torch.Tensor] = {}
    for key, (up, down) in factors.items():
        peft = "base_model.model." + key[len(KEY_PREFIX):]
        t[peft + ".lora_A.weight"] = down
        t[peft + ".lora_B.weight"] = up
    t["head.weight"] = head.weight.detach()
    t["head.bias"] = head.bias.detach()
    _save(t, meta, path)


def load_backbone(seed: int) -> DigitViT:
    model = DigitViT(**MODEL_KW)
    sd = load_file(backbone_path(seed))
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("pretrain_head.")})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_lora(seed: int, variant: str, task: str):
    """(factors {key: (up, down)}, scale, head, metadata)."""
    path = lora_path(seed, variant, task)
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    sd = load_file(path)
    head = torch.nn.Linear(sd["head.weight"].shape[1], sd["head.weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(sd["head.weight"])
        head.bias.copy_(sd["head.bias"])
    factors = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            path_ = k[len("base_model.model."):-len(".lora_A.weight")]
            factors[KEY_PREFIX + path_] = (sd[k.replace("lora_A", "lora_B")], sd[k])
    scale = float(meta["lora_alpha"]) / int(meta["rank"])
    return factors, scale, head, meta


def is_cached(seeds=SEEDS) -> bool:
    for s in seeds:
        if not os.path.exists(backbone_path(s)):
            return False
        for v in VARIANTS:
            for t in D.TASKS:
                p = lora_path(s, v, t)
                if not os.path.exists(p):
                    return False
                with safe_open(p, "pt") as f:
                    if (f.metadata() or {}).get("cache_version") != CACHE_VERSION:
                        return False
    return True


def train_all(seeds=SEEDS, variants=VARIANTS, force: bool = False, log=print) -> None:
    t_all, c_all = time.time(), time.process_time()
    for seed in seeds:
        tasks = D.build(seed)
        if force or not os.path.exists(backbone_path(seed)):
            t0 = time.time()
            model, head = pretrain(seed, tasks)
            acc = accuracy(model, head, tasks["pretrain"]["test"])
            sd = {k: v.detach() for k, v in model.state_dict().items()}
            sd.update({f"pretrain_head.{k}": v.detach() for k, v in head.state_dict().items()})
            _save(sd, {"cache_version": CACHE_VERSION, "pretrain_test_acc": f"{acc:.4f}"}, backbone_path(seed))
            log(f"seed {seed}: backbone pre-trained on digits 0-4, test acc {acc:.3f} ({time.time() - t0:.1f}s)")
        model = load_backbone(seed)
        for variant in variants:
            for task in D.TASKS:
                path = lora_path(seed, variant, task)
                if not force and os.path.exists(path):
                    continue
                rank, alpha, lr = lora_config(seed, variant, task)
                t0 = time.time()
                factors, head = train_lora(model, task, tasks[task], rank, alpha, lr, seed)
                # individual accuracy with the LoRA trained in place
                for k, l in model.adapt_layers():
                    up, down = factors[k]
                    l.delta = (alpha / rank) * up @ down
                va = accuracy(model, head, tasks[task]["val"])
                model.clear_adapters()
                meta = {"cache_version": CACHE_VERSION, "task": task, "variant": variant, "seed": str(seed),
                        "rank": str(rank), "lora_alpha": repr(alpha), "lr": repr(lr),
                        "steps": str(LORA_STEPS), "val_acc": f"{va:.4f}"}
                save_lora(path, factors, head, meta)
                log(f"seed {seed} {variant:7s} {task:8s} r={rank:2d} alpha={alpha:4g} lr={lr:.0e}: "
                    f"val acc {va:.3f} ({time.time() - t0:.1f}s)")
    log(f"training done in {time.time() - t_all:.1f}s wall, {time.process_time() - c_all:.1f}s CPU")


def cache_size_bytes() -> int:
    total = 0
    for root, _, files in os.walk(CACHE):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--force", action="store_true", help="retrain even if cached")
    a = ap.parse_args(argv)
    train_all(tuple(a.seeds), force=a.force)
    print(f"cache: {CACHE} ({cache_size_bytes() / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
