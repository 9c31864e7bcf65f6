"""Train the diffusion benchmark's base model, its concept/style LoRAs and the judge classifier.

Everything is cached as safetensors under ``benchmarks/quality/cache/diffusion/`` (committed)::

    base.safetensors                 UNet state dict (trained on the 5 base subjects)
    judge.safetensors                small CNN: shape class (13) + "styled" (2) heads
    seed<S>/<lora>.safetensors       real diffusers LoRA files: PEFT adapters on the diffusers UNet,
                                     written by ``StableDiffusionPipeline.save_lora_weights`` with
                                     ``lora_adapter_metadata`` (r, lora_alpha) — what users download

One base model is shared by all seeds; a seed changes each LoRA's training draws, which
(rank, alpha, lr) config each LoRA gets (so norms differ several-fold, as with community LoRAs),
and which LoRAs form the T = 2 / 3 subsets (run.py).

    python benchmarks/quality/diffusion_train.py [--seeds 0 1 2] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from safetensors.torch import load_file, save_file  # noqa: E402

import diffusion_model as M  # noqa: E402
import shapes as S  # noqa: E402

CACHE = os.path.join(HERE, "cache", "diffusion")
CACHE_VERSION = "1"
SEEDS = (0, 1, 2)
LORAS: Tuple[str, ...] = S.CONCEPTS + (S.STYLE,)      # 6 concepts + 1 style

BASE_STEPS = 900
LORA_STEPS = 60
JUDGE_STEPS = 300
BATCH = 48
LORA_BATCH = 24

# (rank, lora_alpha, lr): scale α/r 0.5–2, lr 3e-3–1.2e-2 → update norms differ several-fold
LORA_CONFIGS: Tuple[Tuple[int, float, float], ...] = (
    (2, 4.0, 6e-3), (4, 4.0, 4e-3), (8, 4.0, 8e-3), (4, 8.0, 3e-3),
    (2, 2.0, 1.2e-2), (16, 16.0, 3e-3), (8, 8.0, 5e-3),
)


def lora_config(seed: int, name: str) -> Tuple[int, float, float]:
    perm = torch.randperm(len(LORA_CONFIGS), generator=torch.Generator().manual_seed(300 + seed)).tolist()
    return LORA_CONFIGS[perm[LORAS.index(name)]]


def lora_path(seed: int, name: str) -> str:
    return os.path.join(CACHE, f"seed{seed}", f"{name}.safetensors")


BASE_PATH = os.path.join(CACHE, "base.safetensors")
JUDGE_PATH = os.path.join(CACHE, "judge.safetensors")


# ----------------------------------------------------------------------------------------------
def _train_eps(unet, params, data: Dict[str, torch.Tensor], steps: int, batch: int, lr: float, seed: int,
               log=None, tag: str = "") -> float:
    table, ac = M.token_table(), M.alphas_cumprod()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    n = len(data["tok"])
    ema = None
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = data["x"][idx]
        t = torch.randint(0, M.TRAIN_STEPS_T, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = M.eps_loss(unet, table, x0, data["tok"][idx], t, noise, ac)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if log and (step + 1) % 300 == 0:
            log(f"    {tag} step {step + 1}/{steps} loss {ema:.4f}")
    return float(ema)


def train_base(log=print, steps: int = BASE_STEPS):
    unet = M.make_unet(0)
    x, tok = S.make_set(list(S.BASE_SUBJECTS), 200, False, 12345)
    unet.train()
    loss = _train_eps(unet, list(unet.parameters()), {"x": x, "tok": tok}, steps, BATCH, 3e-3, 0, log, "base")
    unet.eval()
    return unet, loss


def load_base():
    unet = M.make_unet(0)
    unet.load_state_dict(load_file(BASE_PATH))
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


def lora_train_data(name: str, seed: int, n: int = 160) -> Dict[str, torch.Tensor]:
    return S.concept_data(name, "train", n, seed)


def train_lora(unet, name: str, seed: int, out_path: str, steps: int = LORA_STEPS, log=None) -> Dict[str, str]:
    """PEFT LoRA on the diffusers UNet, saved through diffusers' ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    rank, alpha, lr = lora_config(seed, name)
    torch.manual_seed(10_000 * seed + LORAS.index(name))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(M.LORA_TARGETS))
    unet.add_adapter(cfg, adapter_name="concept")
    params = [p for n_, p in unet.named_parameters() if "lora_" in n_]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    loss = _train_eps(unet, params, lora_train_data(name, seed), steps, LORA_BATCH, lr, 20_000 * seed + LORAS.index(name),
                      log, name)
    unet.eval()
    # the PEFT layout (unet.<path>.lora_A/lora_B + lora_adapter_metadata), as diffusers' own loader reads it
    sd = get_peft_model_state_dict(unet, adapter_name="concept")
    unet.delete_adapters("concept")
    for p in unet.parameters():
        p.requires_grad_(False)
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": list(M.LORA_TARGETS)}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=sd, weight_name="lora.safetensors",
                                                  unet_lora_adapter_metadata=meta)
        os.replace(os.path.join(d, "lora.safetensors"), out_path)
    return {"rank": str(rank), "lora_alpha": str(alpha), "lr": str(lr), "train_loss": f"{loss:.4f}"}


# ----------------------------------------------------------------------------------------------
# the judge: a small CNN that tells the 13 shapes apart and whether a picture is styled
# ----------------------------------------------------------------------------------------------
class Judge(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 16, 64), torch.nn.ReLU())
        self.shape = torch.nn.Linear(64, len(S.SHAPES))
        self.styled = torch.nn.Linear(64, 2)

    def forward(self, x):
        h = self.body(x)
        return self.shape(h), self.styled(h)


def train_judge(log=print, steps: int = JUDGE_STEPS) -> Judge:
    torch.manual_seed(0)
    j = Judge()
    xs, ys, st = [], [], []
    for styled in (False, True):
        x, tok = S.make_set(list(S.SHAPES), 60, styled, 777 + styled)
        xs.append(x)
        ys.append(tok - 1)                       # token ids 1.. → shape classes 0..
        st.append(torch.full_like(tok, int(styled)))
    x, y, st = torch.cat(xs), torch.cat(ys), torch.cat(st)
    opt = torch.optim.AdamW(j.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        xb = x[idx] + 0.15 * torch.randn(x[idx].shape, generator=g)   # robust to sampler grain
        a, b = j(xb)
        loss = torch.nn.functional.cross_entropy(a, y[idx]) + torch.nn.functional.cross_entropy(b, st[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    j.eval()
    xt, tt = S.make_set(list(S.SHAPES), 20, False, 4242)
    with torch.no_grad():
        acc = (j(xt)[0].argmax(-1) == tt - 1).float().mean().item()
    log(f"  judge: held-out shape accuracy {100 * acc:.1f} %")
    return j


def load_judge() -> Judge:
    j = Judge()
    j.load_state_dict(load_file(JUDGE_PATH))
    j.eval()
    return j


# ----------------------------------------------------------------------------------------------
def is_cached(seeds: Sequence[int] = SEEDS, names: Sequence[str] = LORAS) -> bool:
    meta = os.path.join(CACHE, "meta.json")
    if not (os.path.exists(BASE_PATH) and os.path.exists(JUDGE_PATH) and os.path.exists(meta)):
        return False
    if json.load(open(meta)).get("version") != CACHE_VERSION:
        return False
    return all(os.path.exists(lora_path(s, n)) for s in seeds for n in names)


def train_all(seeds: Sequence[int] = SEEDS, names: Sequence[str] = LORAS, force: bool = False, log=print,
              base_steps: int = BASE_STEPS, lora_steps: int = LORA_STEPS) -> Dict[str, float]:
    os.makedirs(CACHE, exist_ok=True)
    times: Dict[str, float] = {}
    meta_path = os.path.join(CACHE, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    if meta.get("version") != CACHE_VERSION:
        meta, force = {"version": CACHE_VERSION, "loras": {}}, True
    t0 = time.time()
    if force or not os.path.exists(BASE_PATH):
        log("  training the base UNet")
        unet, loss = train_base(log, base_steps)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, BASE_PATH)
        meta["base_loss"] = loss
        times["base"] = time.time() - t0
    t0 = time.time()
    if force or not os.path.exists(JUDGE_PATH):
        j = train_judge(log)
        save_file({k: v.contiguous() for k, v in j.state_dict().items()}, JUDGE_PATH)
        times["judge"] = time.time() - t0
    unet = load_base()
    t0 = time.time()
    for s in seeds:
        for n in names:
            p = lora_path(s, n)
            if os.path.exists(p) and not force:
                continue
            t1 = time.time()
            info = train_lora(unet, n, s, p, lora_steps)
            meta["loras"][f"seed{s}/{n}"] = info
            log(f"  seed {s} {n:9s} r{info['rank']} α{info['lora_alpha']} lr{info['lr']} "
                f"loss {info['train_loss']} ({time.time() - t1:.1f}s)")
    times["loras"] = time.time() - t0
    if os.path.exists(meta_path):           # another process may have trained other seeds meanwhile
        disk = json.load(open(meta_path))
        if disk.get("version") == CACHE_VERSION:
            meta["loras"] = {**disk.get("loras", {}), **meta["loras"]}
    meta["train_seconds"] = {**meta.get("train_seconds", {}), **times}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return times


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--names", nargs="+", default=list(LORAS), help="which LoRAs (in this order)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    train_all(a.seeds, a.names, force=a.force)
    print(f"done in {time.time() - t0:.0f}s wall, {time.process_time():.0f}s CPU")


if __name__ == "__main__":
    main()
