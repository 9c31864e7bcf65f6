"""Tensor keys -> (module name, role): the suffix grammar of every LoRA layout we read (plain LoRA/LoCon,
LyCORIS LoHa/LoKr/GLoRA/OFT/BOFT), and the recognition of adapter types we refuse (OFT, DoRA, full diffs...)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import LoraFormatError, UnsupportedFormatError
from . import lycoris, lycoris_base, peft_adapters

# (suffix, role, family). Longest/most specific first. family: "down_up" (kohya/LyCORIS/ComfyUI:
# scale from .alpha), "ab" (PEFT/diffusers: scale from config), "old" (diffusers attention processors),
# "loha" / "lokr" (LyCORIS Hadamard / Kronecker products, read exactly by formats/lycoris.py).
SUFFIXES: Tuple[Tuple[str, str, str], ...] = (
    (".lora_down.weight", "down", "down_up"),
    (".lora_up.weight", "up", "down_up"),
    (".lora_mid.weight", "mid", "down_up"),
) + peft_adapters.SUFFIXES + (      # PEFT DoRA / OFT / BOFT: read only with a base weight
    (".lora_A.default.weight", "down", "ab"),
    (".lora_B.default.weight", "up", "ab"),
    (".lora_A.weight", "down", "ab"),
    (".lora_B.weight", "up", "ab"),
    (".lora_A", "down", "ab"),
    (".lora_B", "up", "ab"),
    (".lora_linear_layer.down.weight", "down", "old"),
    (".lora_linear_layer.up.weight", "up", "old"),
    ("_lora.down.weight", "down", "old"),
    ("_lora.up.weight", "up", "old"),
    (".lora.down.weight", "down", "old"),
    (".lora.up.weight", "up", "old"),
) + lycoris.SUFFIXES + (
    (".alpha", "alpha", ""),
    (".dora_scale", "dora_scale", ""),      # read only with a base weight (group_keys(allow_dora=True))
    (".oft_blocks", "oft_blocks", "oft"),   # LyCORIS OFT (3-D) / BOFT (4-D): idem
    (".rescale", "rescale", ""),            # OFT/BOFT rescale (ComfyUI applies BOFT's, not OFT's)
)

# markers of adapter types that are not plain LoRA: (substring or suffix test, description)
_UNSUPPORTED: Tuple[Tuple[str, str], ...] = (
    ("oft_blocks", "OFT/BOFT"),
    ("oft_diag", "OFT"),
    (".oft_r", "PEFT OFT from PEFT < 0.14 (oft_r/oft_s; PEFT itself no longer loads these)"),
    (".oft_R", "PEFT OFT"),
    ("boft_", "BOFT"),
    ("dora_scale", "DoRA (dora_scale)"),
    ("lora_magnitude_vector", "DoRA (PEFT lora_magnitude_vector)"),
    ("lora_embedding_A", "PEFT embedding LoRA (lora_embedding_A/B)"),
    ("lora_embedding_B", "PEFT embedding LoRA (lora_embedding_A/B)"),
    ("ia3_", "IA3"),
    (".lora_B.bias", "PEFT lora_bias (lora_B.bias)"),
    ("reshape_weight", "ComfyUI reshape_weight"),
    (".set_weight", "full weight replacement (set_weight)"),
    (".w_norm", "norm-layer weights (w_norm)"),
    (".b_norm", "norm-layer biases (b_norm)"),
    (".a1.weight", "LyCORIS GLoRA"),
    (".b1.weight", "LyCORIS GLoRA"),
)
_UNSUPPORTED_SUFFIX: Tuple[Tuple[str, str], ...] = (
    (".diff_b", "full bias difference (.diff_b)"),
    (".base_layer.weight", "full base weight (PEFT modules_to_save / save_embedding_layers)"),
    (".modules_to_save.default.weight", "full weight (PEFT modules_to_save)"),
)


@dataclass
class ModuleKeys:
    name: str                              # module name as in the file (suffix stripped)
    family: str                            # "down_up" | "ab" | "old"
    keys: Dict[str, str] = field(default_factory=dict)   # role -> tensor key


def classify_unsupported(key: str) -> Optional[str]:
    for marker, what in _UNSUPPORTED:
        if marker in key:
            return what
    for suffix, what in _UNSUPPORTED_SUFFIX:
        if key.endswith(suffix):
            return what
    return None


# XLabs Flux LoRAs: double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight (1: image, 2: text
# stream), single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight
_XLABS = re.compile(r"^((?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")


def split_key(key: str) -> Optional[Tuple[str, str, str]]:
    """(module name, role, family) or None when the key is not a LoRA factor/alpha."""
    m = _XLABS.match(key)
    if m:
        return m.group(1), m.group(2), "xlabs"
    for suffix, role, family in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, family
    return None


def group_keys(keys: Iterable[str], file: Optional[str], allow_dora: bool = False) -> List[ModuleKeys]:
    """Group tensor keys by module, in file order. Raises on the first key of a type we refuse
    (kohya/LyCORIS ``dora_scale`` is refused unless ``allow_dora``: its update needs the base weight)."""
    groups: Dict[str, ModuleKeys] = {}
    pending_alpha: Dict[Tuple[str, str], str] = {}
    keys = list(keys)
    for key in keys:
        what = classify_unsupported(key)
        with_base = key.endswith(lycoris_base.NEEDS_BASE) or peft_adapters.readable_with_base(key)
        if what and allow_dora and with_base:
            what = None
        if what:
            why = peft_adapters.BASE_HINT if with_base else "only plain LoRA/LoCon factors can be merged"
            raise UnsupportedFormatError(f"format found: {what}; {why} (first offending key {key!r})",
                                         file=file, key=key)
    for key in keys:
        parsed = split_key(key)
        if parsed is None:
            raise LoraFormatError(f"tensor {key!r} is not a LoRA factor (expected lora_down/lora_up, "
                                  f"lora_A/lora_B or alpha keys)", file=file, key=key)
        name, role, family = parsed
        if role in ("alpha", "dora_scale", "rescale", "magnitude"):
            pending_alpha[(name, role)] = key
            continue
        g = groups.get(name)
        if g is None:
            g = groups[name] = ModuleKeys(name=name, family=family)
        elif g.family != family:
            # same module written twice in two layouts (e.g. lora_A and lora_down)
            raise LoraFormatError(f"module {name!r} appears in two layouts", file=file, key=key)
        if role in g.keys:
            raise LoraFormatError(f"duplicate {role} factor for module {name!r}", file=file, key=key)
        g.keys[role] = key
    for (name, role), key in pending_alpha.items():
        g = groups.get(name)
        if g is None:
            # old diffusers alphas: "<module>.alpha" where factors are "<module>_lora.down.weight" etc.
            raise LoraFormatError(f"{role} without LoRA factors for module {name!r}", file=file, key=key)
        g.keys[role] = key
    for g in groups.values():
        if g.family in lycoris.FAMILIES:
            if "dora_scale" in g.keys and g.family == "diff":     # ComfyUI ignores it on a .diff patch
                raise UnsupportedFormatError(f"format found: DoRA on a {lycoris.NAMES[g.family]}", file=file,
                                             key=g.keys["dora_scale"])
            lycoris.check_roles(g.name, g.family,
                                {r: k for r, k in g.keys.items() if r not in ("alpha", "rescale", "dora_scale")}, file)
            continue
        if g.family in peft_adapters.FAMILIES:
            peft_adapters.check_roles(g.name, g.family, {r: k for r, k in g.keys.items() if r != "alpha"}, file)
            continue
        if "magnitude" in g.keys and g.family != "ab":
            raise UnsupportedFormatError("format found: lora_magnitude_vector beside non-PEFT factors",
                                         file=file, key=g.keys["magnitude"])
        if "down" not in g.keys:
            raise LoraFormatError(f"module {g.name!r} has an up factor but no down factor", file=file,
                                  key=g.keys.get("up") or g.keys.get("mid"))
        if "up" not in g.keys:
            raise LoraFormatError(f"module {g.name!r} has a down factor but no up factor", file=file,
                                  key=g.keys["down"])
    if not groups:
        raise LoraFormatError("no LoRA modules found in the file", file=file)
    return list(groups.values())
