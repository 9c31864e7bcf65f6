"""A small vision transformer for 8×8 digits, with LoRA on every linear layer.

16 tokens (2×2 patches) + a CLS token, pre-LN blocks with separate q/k/v/o projections and a
two-layer MLP. Every ``nn.Linear`` inside the backbone is an `AdaptLinear`, which can carry
- a trainable LoRA (``ΔW = scale · B @ A``, A: r×in, B: out×r, B starts at zero as in PEFT), or
- a fixed dense update ``delta`` (how a merged LoRA is applied for scoring).

Task heads live outside the backbone (one ``nn.Linear`` per task on the CLS feature).
LoRA module keys are ``model.<module path>`` (e.g. ``model.blocks.0.attn.q``), the canonical
form `domerge_core.Lora` uses for generic PEFT adapters.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KEY_PREFIX = "model."


class AdaptLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A: Optional[nn.Parameter] = None
        self.lora_B: Optional[nn.Parameter] = None
        self.lora_scale: float = 0.0
        self.delta: Optional[torch.Tensor] = None

    def add_lora(self, rank: int, scale: float, generator: torch.Generator) -> None:
        a = torch.empty(rank, self.in_features)
        bound = 1.0 / math.sqrt(self.in_features)        # PEFT's kaiming_uniform(a=√5) bound
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.lora_scale = float(scale)

    def clear(self) -> None:
        self.lora_A = None
        self.lora_B = None
        self.lora_scale = 0.0
        self.delta = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.delta is None else self.weight + self.delta
        y = F.linear(x, w, self.bias)
        if self.lora_A is not None:
            y = y + self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.q = AdaptLinear(d, d)
        self.attn.k = AdaptLinear(d, d)
        self.attn.v = AdaptLinear(d, d)
        self.attn.o = AdaptLinear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc1 = AdaptLinear(d, mlp)
        self.mlp.fc2 = AdaptLinear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.attn.q, self.attn.k, self.attn.v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.ln2(x))))


class DigitViT(nn.Module):
    def __init__(self, d: int = 64, depth: int = 3, heads: int = 4, mlp: int = 128):
        super().__init__()
        self.d = d
        self.embed = AdaptLinear(4, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(depth))
        self.ln = nn.LayerNorm(d)

    @staticmethod
    def patchify(x: torch.Tensor) -> torch.Tensor:
        """N×8×8 -> N×16×4 (2×2 patches, row-major)."""
        n = x.shape[0]
        return x.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS feature, N×d."""
        h = self.embed(self.patchify(x))
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h[:, 0])

    # --- adapters -------------------------------------------------------------------------
    def adapt_layers(self) -> Iterator[Tuple[str, AdaptLinear]]:
        """(canonical key, layer) for every LoRA-able linear layer."""
        for name, mod in self.named_modules():
            if isinstance(mod, AdaptLinear):
                yield KEY_PREFIX + name, mod

    def clear_adapters(self) -> None:
        for _, m in self.adapt_layers():
            m.clear()

    def set_deltas(self, deltas: Dict[str, torch.Tensor]) -> None:
        """Apply dense updates by canonical key (unknown keys are an error; missing keys: none)."""
        layers = dict(self.adapt_layers())
        unknown = set(deltas) - set(layers)
        if unknown:
            raise KeyError(f"merged LoRA has modules the model lacks: {sorted(unknown)[:3]}")
        for k, m in layers.items():
            m.delta = deltas.get(k)
