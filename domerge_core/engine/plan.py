"""Stage 1, plan: the inputs, their strengths, which input provides which module, batches.

Owns the one shape rule (`weight_signature`): two modules patch the same weight when their
``(out, in, kernel)`` agree, where a linear layer and a 1×1 conv of the same size are the same
weight. The input check (`check_compatible`), the module plan and the batching all use it.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import IncompatibleLorasError, InvalidParameterError
from ..lora import Lora, LoraModule

LoraLike = Union[Lora, str, "os.PathLike[str]"]
Multiplier = Optional[Callable[[str], float]]

LOWRANK_BATCH_BYTES = 128 << 20      # stacked factors of one low-rank batch
DENSE_BATCH_BYTES = 256 << 20        # dense task matrices of one ties/dare chunk


# ----------------------------------------------------------------------------------------------
# the shape rule

def weight_signature(mod: LoraModule) -> Tuple[int, int, Tuple[int, ...]]:
    """``(out_features, in_features, kernel)`` of the weight a module patches; ``kernel`` is ``()``
    for a linear layer and for a 1×1 conv (the same weight, stored two ways)."""
    k = tuple(mod.kernel_size) if mod.kind == "conv" and mod.kernel_size else ()
    if k and all(x == 1 for x in k):
        k = ()
    return (mod.out_features, mod.in_features, k)


def _shape(m: LoraModule) -> str:
    return "x".join(str(s) for s in m.weight_shape)


def check_compatible(loras: Sequence[Lora]) -> None:
    """Raise `IncompatibleLorasError` when the same file is given twice, when two inputs patch the
    same module with different shapes (e.g. SD1.5 and SDXL), or when they share no module at all
    while their base models differ. (Inputs that share no module but may be for one model — a
    UNet-only and a text-encoder-only LoRA — pass.) The message names both files and one
    conflicting module with both shapes."""
    if len(loras) < 2:
        return
    _refuse_same_file(loras)
    seen: Dict[str, Tuple[Lora, LoraModule]] = {}
    for lora in loras:
        for key, m in lora.modules.items():
            prev = seen.setdefault(key, (lora, m))
            pl, pm = prev
            if pm is not m and weight_signature(pm) != weight_signature(m):
                raise IncompatibleLorasError(
                    f"{pl.name} and {lora.name} are for different base models: module {key} is "
                    f"{_shape(pm)} in {pl.name} but {_shape(m)} in {lora.name}", file=lora.source,
                    key=m.source_name or key)
    first = loras[0]
    for other in loras[1:]:
        bf, bo = first.base_model, other.base_model
        if bf and bo and bf != bo and not (set(first.modules) & set(other.modules)):
            k1, k2 = next(iter(first.modules), "-"), next(iter(other.modules), "-")
            raise IncompatibleLorasError(
                f"{first.name} ({bf}) and {other.name} ({bo}) are for different base models and share "
                f"no module (e.g. {k1} vs {k2})", file=other.source)


def _refuse_same_file(loras: Sequence[Lora]) -> None:
    """The same file given twice (also through a link) is almost surely a mistake: its weight would
    simply double. Give it once with a larger weight instead."""
    files: List[str] = []
    for lora in loras:
        src = getattr(lora, "source", None)
        if not src or not os.path.isfile(src):
            continue
        for prev in files:
            same = os.path.abspath(prev) == os.path.abspath(src)
            if not same:
                try:
                    same = os.path.samefile(prev, src)
                except OSError:
                    same = False
            if same:
                how = "twice" if os.path.abspath(prev) == os.path.abspath(src) else f"twice (also as {prev})"
                raise IncompatibleLorasError(f"the same file is given {how}; give it once with a larger "
                                             f"weight instead", file=src)
        files.append(src)


# ----------------------------------------------------------------------------------------------
# inputs and strengths

def load_inputs(inputs: Union[LoraLike, Sequence[LoraLike]], base=None) -> List[Lora]:
    """Lora objects as given; paths read with ``base`` (the base model DoRA/OFT/BOFT/GLoRA files need)."""
    if isinstance(inputs, (str, os.PathLike, Lora)):
        inputs = [inputs]
    if base is not None:
        from ..formats.base_pipeline import as_base
        base = as_base(base)          # once: a checkpoint's header is read once for all inputs
    out = []
    for x in inputs:
        if isinstance(x, Lora):
            out.append(x)
        elif isinstance(x, (str, os.PathLike)):
            from ..formats import load_lora
            out.append(load_lora(os.fspath(x), base=base))
        else:
            raise InvalidParameterError(f"merge input must be a Lora or a file path, not {type(x).__name__}")
    if not out:
        raise InvalidParameterError("merge needs at least one input LoRA")
    return out


def input_tags(loras: Sequence[Lora]) -> List[str]:
    """Stable per-input names for random seeds: file name, ``#n`` for the n-th repeat."""
    seen: Dict[str, int] = {}
    out = []
    for lora in loras:
        name = lora.name or lora.source or "<memory>"
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}#{n}")
    return out


def sources(loras: Sequence[Lora]) -> List[str]:
    return [l.source or f"input {i}" for i, l in enumerate(loras)]


def _finite(x, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        raise InvalidParameterError(f"{what} must be a number, not {x!r}") from None
    if not math.isfinite(v):
        raise InvalidParameterError(f"{what} {v} is not finite")
    return v


def check_weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise InvalidParameterError(f"weights must be a list of numbers, one per input, not {weights!r}")
    w = [_finite(x, "weight") for x in weights]
    if len(w) != n:
        raise InvalidParameterError(f"{len(w)} weights given for {n} input LoRAs")
    return w


def check_run_options(rank=None, energy=None, seed=0) -> Tuple[Optional[int], Optional[float], int]:
    """(rank, energy, seed) validated: the output rank a positive integer below 2^31, the kept
    energy in (0, 1], the seed an integer in [0, 2^63). The CLI calls this before reading a file."""
    if rank is not None:
        try:
            ok = not isinstance(rank, bool) and float(rank) == int(rank) and 1 <= int(rank) < 1 << 31
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise InvalidParameterError(f"rank must be a positive integer below 2^31, not {str(rank)[:40]!r}")
        rank = int(rank)
    if energy is not None:
        try:
            energy = float(energy)
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameterError(f"energy must be a number in (0, 1], not {str(energy)[:40]!r}") from None
        if not (0.0 < energy <= 1.0):
            raise InvalidParameterError(f"energy must be in (0, 1], not {energy}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 1 << 63:
        raise InvalidParameterError(f"seed must be an integer in [0, 2^63), not {str(seed)[:40]!r}")
    return rank, energy, int(seed)


def check_multipliers(multipliers: Optional[Sequence[Multiplier]], n: int) -> List[Multiplier]:
    if multipliers is None:
        return [None] * n
    out = list(multipliers)
    if len(out) != n:
        raise InvalidParameterError(f"{len(out)} multipliers given for {n} input LoRAs")
    for f in out:
        if f is not None and not callable(f):
            raise InvalidParameterError(f"a multiplier must be a function of the module key, not {f!r}")
    return out


# ----------------------------------------------------------------------------------------------
# module jobs and batches

@dataclass
class ModuleJob:
    """One output module: the inputs that have it, and those that merge into it (non-zero
    strength there), with their strengths for this module."""
    key: str
    present: List[Tuple[int, LoraModule]] = field(default_factory=list)
    active: List[Tuple[int, LoraModule]] = field(default_factory=list)
    strengths: List[float] = field(default_factory=list)     # one per active input

    @property
    def first(self) -> LoraModule:
        return self.present[0][1]

    @property
    def inputs(self) -> Tuple[int, ...]:
        return tuple(i for i, _ in self.active)


def plan_modules(loras: Sequence[Lora], weights: Sequence[float],
                 multipliers: Optional[Sequence[Multiplier]] = None) -> List[ModuleJob]:
    """Union of the inputs' module keys in first-seen order. The strength of input i on module k is
    ``weights[i] · multipliers[i](k)`` (block weights, a CLIP strength); 0 leaves the input out of
    that module."""
    mult = list(multipliers) if multipliers is not None else [None] * len(loras)
    jobs: Dict[str, ModuleJob] = {}
    for i, lora in enumerate(loras):
        f = mult[i]
        for key, mod in lora.modules.items():
            job = jobs.get(key)
            if job is None:
                job = jobs[key] = ModuleJob(key)
            elif weight_signature(job.first) != weight_signature(mod):
                ref_i = job.present[0][0]
                raise IncompatibleLorasError(
                    f"module {key}: shape {job.first.weight_shape} in {loras[ref_i].source} but "
                    f"{mod.weight_shape} here (LoRAs for different base models?)",
                    file=lora.source, key=mod.source_name or key)
            job.present.append((i, mod))
            w = weights[i] if f is None else weights[i] * _finite(f(key), f"multiplier of {key}")
            if w != 0.0:
                job.active.append((i, mod))
                job.strengths.append(w)
    return list(jobs.values())


def batch_signature(job: ModuleJob) -> Tuple:
    """Jobs of equal signature are stacked into one batch: same weight, same active inputs, same
    ranks."""
    return weight_signature(job.first) + (job.inputs, tuple(mod.rank for _, mod in job.active))


def batch_jobs(jobs: Sequence[ModuleJob], elem_bytes: int, dense: bool) -> List[List[ModuleJob]]:
    """Group jobs of equal signature, in first-seen order, chunked to a memory budget."""
    groups: Dict[Tuple, List[ModuleJob]] = {}
    for job in jobs:
        if job.active:
            groups.setdefault(batch_signature(job), []).append(job)
    out = []
    for sig, js in groups.items():
        m, n, _, idx, ranks = sig
        R = sum(ranks)
        per = (m + n) * R * elem_bytes * 4
        if dense and len(idx) > 1:
            per = max(per, (len(idx) + 2) * m * n * elem_bytes)
        budget = DENSE_BATCH_BYTES if dense else LOWRANK_BATCH_BYTES
        size = max(1, budget // max(per, 1))
        for s in range(0, len(js), size):
            out.append(js[s:s + size])
    return out
