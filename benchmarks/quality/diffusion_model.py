"""The tiny text-conditioned diffusion model of the diffusion benchmark (pixel space, 16×16 RGB).

- UNet: a diffusers ``UNet2DConditionModel`` (the class SD1.x uses), two resolutions, cross-
  attention at 8×8, ~0.3 M parameters.
- Text encoder: a frozen token-embedding table (seeded random vectors, like the rare tokens that
  community LoRAs use as triggers: the base never learned what they mean). A prompt is
  ``[<start>, <subject>]`` → ``encoder_hidden_states`` (B, 2, 32).
- Noise schedule: DDPM (1000 steps, scaled-linear β), ε-prediction; sampling with diffusers'
  ``DDIMScheduler`` (few steps, η = 0, fixed seeds).

`fuse` is the only place a LoRA touches the model: W += scale·up@down per canonical
``unet.<module path>`` key, exactly as ``pipe.fuse_lora()`` does.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

import shapes as S

EMB_DIM = 32
TRAIN_STEPS_T = 1000
# Modules a LoRA adapts (PEFT target_modules): attention, feed-forward and the transformer's
# in/out projections of every cross-attention block, as most SD1.x LoRA trainers do.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def make_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=S.SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMB_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def token_table(seed: int = 0) -> torch.Tensor:
    """Frozen embeddings (len(TOKENS) × EMB_DIM), unit RMS."""
    g = torch.Generator().manual_seed(7_000 + seed)
    return torch.randn(len(S.TOKENS), EMB_DIM, generator=g)


def encode(table: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    start = torch.full_like(tok, S.token_id(S.START))
    return table[torch.stack([start, tok], dim=1)]


def schedule():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=TRAIN_STEPS_T, beta_start=0.00085 * 2, beta_end=0.02,
                         beta_schedule="scaled_linear", clip_sample=True, set_alpha_to_one=True)


def alphas_cumprod() -> torch.Tensor:
    return schedule().alphas_cumprod.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def eps_loss(unet, table, x0, tok, t, noise, ac, reduce: bool = True, region=None) -> torch.Tensor:
    """ε-prediction MSE (per picture unless ``reduce``); ``region`` (N×16×16): only those pixels."""
    pred = unet(add_noise(x0, noise, t, ac), t, encoder_hidden_states=encode(table, tok)).sample
    sq = (pred - noise).pow(2)
    if region is None:
        err = sq.flatten(1).mean(1)
    else:
        w = region[:, None].expand_as(sq)
        err = (sq * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)
    return err.mean() if reduce else err


@torch.no_grad()
def sample(unet, table, tok: torch.Tensor, seed: int, steps: int = 10) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from fixed-seed noise; pictures in [-1, 1]."""
    sch = schedule()
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(tok), 3, S.SIZE, S.SIZE, generator=g)
    cond = encode(table, tok)
    for t in sch.timesteps:
        eps = unet(x, t, encoder_hidden_states=cond).sample
        x = sch.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# a merged LoRA on the model: W += ΔW (and back)
# ----------------------------------------------------------------------------------------------
class Fuser:
    """Adds a `domerge_core.Lora`'s dense updates to the UNet weights and restores them."""

    def __init__(self, unet):
        self.unet = unet
        self.saved: Dict[str, torch.Tensor] = {}

    def fuse(self, lora: Optional["object"]) -> None:
        self.unfuse()
        if lora is None:
            return
        for m in lora:
            comp, _, path = m.key.partition(".")
            if comp != "unet":
                raise KeyError(f"unexpected module {m.key}")
            w = self.unet.get_submodule(path).weight
            self.saved[path] = w.detach().clone()
            with torch.no_grad():
                w.add_(m.delta(torch.float32).reshape(w.shape))

    def unfuse(self) -> None:
        with torch.no_grad():
            for path, w0 in self.saved.items():
                self.unet.get_submodule(path).weight.copy_(w0)
        self.saved = {}
