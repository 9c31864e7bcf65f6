"""safetensors metadata of a merged LoRA.

Carried from the inputs where they agree: ``ss_base_model_version``, ``ss_v2``, ``ss_network_module``
and the SAI ModelSpec fields that describe the base model (``modelspec.architecture``, ...). Set anew:
``ss_network_dim``/``ss_network_alpha`` (alpha = rank is what the writers store; ``"Dynamic"`` when
ranks differ), ``modelspec.merged_from``, and ``domerge`` — a JSON record of the merge (version,
method, parameters, and per input its file name, sha256 and weight). Training metadata (tag
frequencies, datasets, hashes of the inputs) is not carried: it describes none of the output.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Sequence, Union

from .lora import Lora

CARRIED = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_sd_model_name",
           "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
           "modelspec.prediction_type", "modelspec.resolution")

RankInfo = Union[None, int, str, Iterable[int], Lora]


def _rank_value(rank_info: RankInfo) -> Optional[str]:
    if rank_info is None:
        return None
    if isinstance(rank_info, str):
        return rank_info
    if isinstance(rank_info, int):
        return str(rank_info)
    if isinstance(rank_info, Lora):
        ranks = {m.rank for m in rank_info}
    else:
        ranks = set(int(r) for r in rank_info)
    if not ranks:
        return None
    return str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"


def _title(lora: Lora) -> str:
    t = (lora.metadata or {}).get("modelspec.title")
    if t:
        return t
    return os.path.splitext(lora.name)[0] if lora.source and not lora.source.startswith("<") else lora.source


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, dict):
            return {str(k): _jsonable(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [_jsonable(x) for x in v]
        return str(v)


def input_record(lora: Lora, weight: float) -> Dict[str, Any]:
    from .formats.safetensors import sha256_cached

    src = lora.source
    sha = None
    if lora.content_sha256 is not None:      # the bytes actually merged (checked unchanged while read)
        sha = lora.content_sha256()
    elif src and os.path.isfile(src):
        sha = sha256_cached(src)
    return {"file": os.path.basename(src) if src else None, "sha256": sha, "weight": float(weight),
            "format": lora.format}


def output_metadata(inputs: Sequence[Lora], *, weights: Sequence[float], method: str,
                    params: Optional[Dict[str, Any]] = None, rank_info: RankInfo = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Metadata (str -> str) for the file of a merge of ``inputs`` with ``weights`` by ``method``."""
    from . import __version__

    md: Dict[str, str] = {}
    for key in CARRIED:
        values = {(l.metadata or {}).get(key) for l in inputs} - {None, ""}
        if len(values) == 1:
            md[key] = next(iter(values))
    r = _rank_value(rank_info)
    if r is not None:
        md["ss_network_dim"] = r
        md["ss_network_alpha"] = r
    md["modelspec.merged_from"] = ", ".join(_title(l) for l in inputs)
    record = {
        "version": __version__,
        "method": method,
        "params": _jsonable(dict(params or {})),
        "inputs": [input_record(l, w) for l, w in zip(inputs, weights)],
    }
    md["domerge"] = json.dumps(record, sort_keys=True)
    for k, v in (extra or {}).items():
        md[str(k)] = v if isinstance(v, str) else json.dumps(_jsonable(v))
    return md
