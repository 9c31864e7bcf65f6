"""The canonical in-memory LoRA: what every reader produces and every writer and method consumes.

Per module the update is ``ΔW = scale · up @ down`` with
- ``down`` (A): ``rank × in_features``; conv kernels are flattened to ``in_channels·kh·kw``
  (a Tucker ``lora_mid`` is folded in by the reader),
- ``up`` (B): ``out_features × rank``,
- ``scale``: the format's scale (kohya ``alpha/rank``, PEFT ``lora_alpha/r``, rsLoRA
  ``lora_alpha/√r``; a missing alpha means 1).

Module keys are *canonical*: ``<component>.<diffusers module path>``, the same whatever file
format the module came from, so LoRAs of one base model line up across formats:
- ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` (SD1.x / SD2.x / SDXL; SDXL
  kohya SGM names are mapped to diffusers paths),
- ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (``text_encoder_2``, ``text_encoder_3``),
- ``transformer.<diffusers path>`` (DiT pipelines: Flux, SD3, ...; kohya Flux fused qkv is split),
- ``model.<path>`` for generic PEFT adapters (``base_model.model.<path>``),
- ``diffusion_model.<path>`` / ``text_encoders.<path>`` for ComfyUI-native keys that have no
  diffusers equivalent known to us.

Loading is lazy: a module holds a ``loader`` that reads its tensors from the open safetensors
file on demand, so a large file is never held twice.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

FactorLoader = Callable[[], Tuple[torch.Tensor, torch.Tensor]]
_UIDS = itertools.count(1)


@dataclass
class LoraModule:
    key: str                               # canonical key (see module docstring)
    kind: str                              # "linear" | "conv"
    out_features: int                      # m
    in_features: int                       # n (conv: in_channels * kh * kw)
    rank: int
    scale: float                           # format scale; ΔW = scale · up @ down
    loader: FactorLoader                   # -> (up m×r, down r×n), file dtype, scale NOT applied
    kernel_size: Optional[Tuple[int, ...]] = None   # conv only: down kernel (kh, kw); up is 1×1
    source_name: Optional[str] = None      # module name as written in the source file
    dtype: torch.dtype = torch.float32     # dtype of the stored factors
    # identity for caches: unique per object, never reused (``replace`` makes a new one)
    uid: int = field(default_factory=lambda: next(_UIDS), init=False, repr=False, compare=False)

    def factors(self, dtype: torch.dtype = torch.float32, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """(up m×r, down r×n) as 2-D tensors, without the scale."""
        up, down = self.loader()
        up = up.reshape(self.out_features, -1).to(device=device, dtype=dtype)
        down = down.reshape(down.shape[0], -1).to(device=device, dtype=dtype)
        return up, down

    def scaled_factors(self, dtype: torch.dtype = torch.float32, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale·up, down): the update is exactly their product."""
        up, down = self.factors(dtype, device)
        return up * self.scale, down

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense update (m×n, conv flattened). For tests and small modules only."""
        up, down = self.scaled_factors(dtype)
        return up @ down

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        """Shape of the base weight this module patches (conv: out, in, kh, kw)."""
        if self.kind == "conv" and self.kernel_size:
            kk = 1
            for k in self.kernel_size:
                kk *= k
            return (self.out_features, self.in_features // kk, *self.kernel_size)
        return (self.out_features, self.in_features)

    @staticmethod
    def from_tensors(key: str, up: torch.Tensor, down: torch.Tensor, scale: float = 1.0, *,
                     kernel_size: Optional[Tuple[int, ...]] = None, source_name: Optional[str] = None) -> "LoraModule":
        """A module over in-memory factors. ``up``: m×r (or m×r×1×1); ``down``: r×n (or r×c×kh×kw)."""
        if down.dim() == 4 and kernel_size is None:
            kernel_size = tuple(down.shape[2:])
        kind = "conv" if kernel_size is not None else "linear"
        up2 = up.reshape(up.shape[0], -1)
        down2 = down.reshape(down.shape[0], -1)
        return LoraModule(key=key, kind=kind, out_features=up2.shape[0], in_features=down2.shape[1],
                          rank=down2.shape[0], scale=float(scale), loader=lambda: (up2, down2),
                          kernel_size=kernel_size, source_name=source_name, dtype=up.dtype)


@dataclass
class Lora:
    """An ordered set of modules plus what the file said about itself."""
    modules: Dict[str, LoraModule]
    format: str                            # "kohya" | "diffusers" | "peft" | "comfy" | "diffusers_old" | "merged"
    source: str = "<memory>"               # file path, or a label for in-memory state dicts
    metadata: Dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32     # dominant dtype of the stored factors
    base_model: Optional[str] = None       # guess: "sd1", "sd2", "sdxl", "flux", "sd3", "llm", ... or None
    layout: Dict[str, str] = field(default_factory=dict)   # writer hints (e.g. {"unet_names": "sgm"})
    # sha256 of the very bytes the factors are read from (files: formats.safetensors.LazyFile)
    content_sha256: Optional[Callable[[], str]] = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, key: str) -> bool:
        return key in self.modules

    def __getitem__(self, key: str) -> LoraModule:
        return self.modules[key]

    @property
    def name(self) -> str:
        import os
        return os.path.basename(self.source)

    def num_parameters(self) -> int:
        return sum(m.rank * (m.out_features + m.in_features) for m in self.modules.values())

    def rekey(self, fn: Callable[[LoraModule], Optional[str]]) -> "Lora":
        """A copy whose modules are renamed by ``fn`` (None drops the module). Adapters use this to
        align through a host's own key map (ComfyUI's model_lora_keys_*)."""
        out: Dict[str, LoraModule] = {}
        for m in self.modules.values():
            k = fn(m)
            if k is not None:
                out[k] = replace(m, key=k)
        return replace(self, modules=out)
