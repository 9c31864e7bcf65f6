"""Diagnostics as data (JSON-serialisable): what `merge` reports and what ``domerge inspect`` prints.

Everything comes from r×r Grams of the factors (never an m×n matrix):
- per LoRA and per block: update norms ``‖ΔW_i‖_F`` (at strength 1, and at the given strengths) over
  every module the LoRA has — shared ones, ones only it has, and all of them at strength 0;
- magnitude distribution variance [ours, method.md]: per module ``s_i = |w_i|·‖ΔW_i‖_F``,
  normalised by the mean over the LoRAs that have the module, variance over them; averaged over
  modules (0 when all LoRAs have equal norms);
- the pairwise cosine matrix of the LoRAs (whole model, and per block), before and after the
  orthogonalization: ``Σ_modules ⟨ΔW_i, ΔW_j⟩ / sqrt(Σ‖ΔW_i‖² · Σ‖ΔW_j‖²)`` over the modules both have;
- ``‖δA‖/‖A‖`` and ``‖δB‖/‖B‖`` of the orthogonalization (mean per LoRA);
- ranks, and the truncation energy: the energy fraction of the task-arithmetic merge kept at the
  largest input rank, and the rank needed for 99 % of it (exact: QR + core SVD).
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence

from ..lora import Lora

_NUM = re.compile(r"^\d+$")


def block_of(key: str) -> str:
    """A coarse block name: the key up to its first numeric path segment (``unet.down_blocks.1``,
    ``text_encoder.text_model.encoder.layers.3``, ``transformer.transformer_blocks.7``)."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if i > 0 and _NUM.match(p):
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2]) if len(parts) > 1 else key


def lora_name(lora: Lora, i: int) -> str:
    try:
        name = lora.name
    except Exception:  # noqa: BLE001
        name = ""
    return name if name and not name.startswith("<") else f"lora{i}"


class _Acc:
    """Accumulates ⟨ΔW_i, ΔW_j⟩ over modules for one scope (model or block)."""

    def __init__(self, T: int):
        self.before = [[0.0] * T for _ in range(T)]
        self.after = [[0.0] * T for _ in range(T)]
        self.modules = 0
        self.abs_cos_before: List[float] = []
        self.abs_cos_after: List[float] = []

    def add(self, idx, cos_b, cos_a, nb, na):
        self.modules += 1
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                self.before[i][j] += cos_b[a][b] * nb[a] * nb[b]
                self.after[i][j] += cos_a[a][b] * na[a] * na[b]
                if a < b:
                    self.abs_cos_before.append(abs(cos_b[a][b]))
                    self.abs_cos_after.append(abs(cos_a[a][b]))

    @staticmethod
    def _cos(K):
        T = len(K)
        return [[(K[i][j] / math.sqrt(K[i][i] * K[j][j]) if K[i][i] > 0 and K[j][j] > 0 else 0.0)
                 for j in range(T)] for i in range(T)]

    def out(self) -> Dict[str, Any]:
        mb = sum(self.abs_cos_before) / len(self.abs_cos_before) if self.abs_cos_before else 0.0
        ma = sum(self.abs_cos_after) / len(self.abs_cos_after) if self.abs_cos_after else 0.0
        return {"modules": self.modules, "cosine_before": self._cos(self.before),
                "cosine_after": self._cos(self.after), "mean_abs_cos_before": mb, "mean_abs_cos_after": ma}


def summarize(records: Dict[str, Dict[str, Any]], names: Sequence[str], weights: Sequence[float],
              per_block: bool = True, extra_norms: Optional[Dict[str, Sequence]] = None) -> Dict[str, Any]:
    """Per-LoRA, per-block and whole-model diagnostics from per-module records
    (``inputs``, ``norms``, ``norms_after``, ``cos_before``, ``cos_after``, ``rel_delta_A/B``).

    Norms count every module a LoRA has: the records of modules merged from ≥ 2 LoRAs, those of
    modules only one LoRA has (``inputs``/``norms`` of length 1, no cosines), and ``extra_norms``
    ({key: [(input, ‖ΔW‖)]}: modules of inputs at strength 0, which the merge leaves out).
    ``modules_merged`` counts the records only; cosines and the magnitude variance use the modules
    of ≥ 2 LoRAs; ``rel_delta_*`` the records that carry them."""
    T = len(names)
    model = _Acc(T)
    blocks: Dict[str, _Acc] = {}
    block_norms: Dict[str, List[float]] = {}
    norm2 = [0.0] * T
    count = [0] * T
    dA = [[] for _ in range(T)]
    dB = [[] for _ in range(T)]
    mvars: List[float] = []
    for key, rec in records.items():
        idx = rec.get("inputs", [])
        if "norms" not in rec:
            continue
        nb, na = rec["norms"], rec.get("norms_after", rec["norms"])
        blk = block_of(key)
        bn = block_norms.setdefault(blk, [0.0] * T)
        for a, i in enumerate(idx):
            norm2[i] += nb[a] ** 2
            bn[i] += nb[a] ** 2
            count[i] += 1
            if "rel_delta_A" in rec:
                dA[i].append(rec["rel_delta_A"][a])
                dB[i].append(rec["rel_delta_B"][a])
        if len(idx) >= 2:
            model.add(idx, rec["cos_before"], rec["cos_after"], nb, na)
            if per_block:
                blocks.setdefault(blk, _Acc(T)).add(idx, rec["cos_before"], rec["cos_after"], nb, na)
            s = [abs(weights[i]) * nb[a] for a, i in enumerate(idx)]
            mean = sum(s) / len(s)
            if mean > 0:
                sn = [x / mean for x in s]
                mvars.append(sum((x - 1.0) ** 2 for x in sn) / len(sn))
    for key, pairs in (extra_norms or {}).items():
        bn = block_norms.setdefault(block_of(key), [0.0] * T)
        for i, v in pairs:
            norm2[i] += float(v) ** 2
            bn[i] += float(v) ** 2
    loras = []
    for i in range(T):
        loras.append({
            "name": names[i], "weight": float(weights[i]), "modules_merged": count[i],
            "update_norm": math.sqrt(norm2[i]), "weighted_update_norm": abs(weights[i]) * math.sqrt(norm2[i]),
            "rel_delta_A_mean": (sum(dA[i]) / len(dA[i])) if dA[i] else 0.0,
            "rel_delta_A_max": max(dA[i]) if dA[i] else 0.0,
            "rel_delta_B_mean": (sum(dB[i]) / len(dB[i])) if dB[i] else 0.0,
            "rel_delta_B_max": max(dB[i]) if dB[i] else 0.0,
        })
    out: Dict[str, Any] = {
        "loras": loras,
        "magnitude_variance": (sum(mvars) / len(mvars)) if mvars else 0.0,
        **model.out(),
    }
    if per_block:
        out["blocks"] = {
            blk: {"update_norms": [math.sqrt(x) for x in block_norms[blk]],
                  **(blocks[blk].out() if blk in blocks else _Acc(T).out())}
            for blk in block_norms}
    return out


def merge_report(loras: Sequence[Lora], weights: Sequence[float], method: str, params: Dict[str, Any],
                 records: Dict[str, Dict[str, Any]], jobs, rank=None, energy=None,
                 extra_norms: Optional[Dict[str, Sequence]] = None) -> Dict[str, Any]:
    """The `MergeResult.report` dict (``extra_norms``: see `summarize`)."""
    names = [lora_name(l, i) for i, l in enumerate(loras)]
    errs = [r["rel_error"] for r in records.values()]
    ranks = [r["rank"] for r in records.values()]
    skipped = [j.key for j in jobs if j.key not in records]
    return {
        "method": method,
        "params": dict(params),
        "weights": [float(x) for x in weights],
        "inputs": names,
        "rank": rank,
        "energy": energy,
        "summary": {
            "modules": len(records),
            "modules_skipped": len(skipped),
            "rank_min": min(ranks) if ranks else 0,
            "rank_max": max(ranks) if ranks else 0,
            "rank_mean": (sum(ranks) / len(ranks)) if ranks else 0.0,
            "rel_error_max": max(errs) if errs else 0.0,
            "rel_error_mean": (sum(errs) / len(errs)) if errs else 0.0,
        },
        "diagnostics": summarize(records, names, weights, extra_norms=extra_norms),
        "modules": records,
        "skipped": skipped,
    }
