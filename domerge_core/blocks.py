"""Per-block weights ("LoRA block weight", kohya / supermerger / the Inspire pack's block-weight loader).

A block-weight vector gives one factor per block of the diffusion model; position 0 (``BASE``) is
everything outside the blocks: the text encoders and the model's embeddings/heads. A module's factor
multiplies that input's strength for that module (see ``merge(..., multipliers=)``).

Block of a canonical key (``lora.py``), in the SGM numbering the vectors are written in:

- SD1.x / SD2.x UNet (4 levels, 2 layers each): ``down_blocks.i.{resnets,attentions}.j`` → ``IN{1+3i+j}``,
  ``down_blocks.i.downsamplers`` → ``IN{3i+3}``, ``conv_in`` → ``IN00``; ``mid_block.resnets.0 / attentions.0 /
  resnets.1`` → ``M00 / M01 / M02``; ``up_blocks.i.{resnets,attentions}.j`` → ``OUT{3i+j}``,
  ``up_blocks.i.upsamplers`` → ``OUT{3i+2}``; anything else (``time_embedding``, ``conv_out``, ...) → BASE.
- SDXL: the same rule over its 3 levels (IN00–IN08, OUT00–OUT08).
- Flux: ``transformer_blocks.i`` (BFL ``double_blocks.i``) → ``D{i}``, ``single_transformer_blocks.i``
  (``single_blocks.i``) → ``S{i}``; the rest → BASE.

Vector layouts (the length picks the layout; blocks a layout does not name keep factor 1):

======  ======  ===========================================================================
family  length  positions
======  ======  ===========================================================================
SD1/2   17      BASE, IN01 IN02 IN04 IN05 IN07 IN08, MID, OUT03–OUT11 (the common LoRA vector)
SD1/2   26      BASE, IN00–IN11, MID, OUT00–OUT11 (a1111 block-weight, LyCORIS)
SD1/2   27      BASE, IN01–IN11, M00 M01 M02, OUT00–OUT11 (Inspire pack ``SD-LyC-*``)
SDXL    12      BASE, IN04 IN05 IN07 IN08, MID, OUT00–OUT05
SDXL    20      BASE, IN00–IN08, MID, OUT00–OUT08
SDXL    21      BASE, IN01–IN08, M00 M01 M02, OUT00–OUT08 (Inspire pack ``SDXL-LyC-*``)
Flux    58      BASE, D00–D18 (double blocks), S00–S37 (single blocks)
Flux    20      BASE, D00–D18; the single blocks take the last value
Flux    18      BASE, D00–D16; D17, D18 and the single blocks take the last value
======  ======  ===========================================================================

The 17 / 12 / 27 / 21 layouts are the positions the Inspire pack's loader assigns for a LoRA that
trains the usual set of blocks (it numbers the blocks present in the file); the presets below are
its named presets with the same values. Flux follows the Inspire loader's positional rule on a LoRA
over all 19 double and 38 single blocks: one value per block, double blocks first, and blocks past
the end of the vector keep its last value ("use last used ratio"), which is how its 18-value
``FLUX-DBL-FRONT/MID/TAIL`` presets reach D17, D18 and the single blocks. (Its ``SD-ROUT``/``SD-AOUT``/
``SD-AB`` presets use the loader's random / A / B letters, which have no meaning here.)
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence

from .errors import InvalidParameterError
from .formats.canonical import is_text_encoder


def _r(prefix: str, a: int, b: int) -> List[str]:
    return [f"{prefix}{i:02d}" for i in range(a, b + 1)]


MID = ("M00", "M01", "M02")
LAYOUTS: Dict[str, Dict[int, List[str]]] = {
    "sd1": {
        17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + _r("OUT", 3, 11),
        26: ["BASE"] + _r("IN", 0, 11) + ["MID"] + _r("OUT", 0, 11),
        27: ["BASE"] + _r("IN", 1, 11) + list(MID) + _r("OUT", 0, 11),
    },
    "sdxl": {
        12: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + _r("OUT", 0, 5),
        20: ["BASE"] + _r("IN", 0, 8) + ["MID"] + _r("OUT", 0, 8),
        21: ["BASE"] + _r("IN", 1, 8) + list(MID) + _r("OUT", 0, 8),
    },
    "flux": {
        58: ["BASE"] + _r("D", 0, 18) + _r("S", 0, 37),
        20: ["BASE"] + _r("D", 0, 18),
        18: ["BASE"] + _r("D", 0, 16),
    },
}
# families whose shorter vectors run on positionally: the blocks after the vector's end take its last value
CONTINUES = {"flux": LAYOUTS["flux"][58]}
FAMILY_OF = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "flux": "flux"}

PRESETS: Dict[str, str] = {
    "SD-NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "SD-INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "SD-IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "SD-MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "SD-MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
    "SD-MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
    "SD-MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
    "SD-OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "SD-OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "SD-OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "SD-ALL0.5": ",".join(["0.5"] * 17),
    "SD-LyC-NONE": ",".join(["0"] * 27),
    "SD-LyC-ALL": ",".join(["1"] * 27),
    "SD-LyC-INALL": ",".join(["1"] * 12 + ["0"] * 15),
    "SD-LyC-MIDALL": ",".join(["1"] + ["0"] * 11 + ["1"] * 3 + ["0"] * 12),
    "SD-LyC-OUTALL": ",".join(["1"] + ["0"] * 14 + ["1"] * 12),
    "SDXL-NONE": ",".join(["0"] * 12),
    "SDXL-ALL": ",".join(["1"] * 12),
    "SDXL-INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "SDXL-OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "SDXL-LyC-NONE": ",".join(["0"] * 21),
    "SDXL-LyC-ALL": ",".join(["1"] * 21),
    "SDXL-LyC-INALL": ",".join(["1"] * 9 + ["0"] * 12),
    "SDXL-LyC-MIDALL": ",".join(["1"] + ["0"] * 8 + ["1"] * 3 + ["0"] * 9),
    "SDXL-LyC-OUTALL": ",".join(["1"] + ["0"] * 11 + ["1"] * 9),
    "FLUX-ALL": ",".join(["1"] * 58),
    "FLUX-DOUBLE": ",".join(["1"] * 20 + ["0"] * 38),
    "FLUX-SINGLE": ",".join(["1"] + ["0"] * 19 + ["1"] * 38),
    # the Inspire pack's resources/lbw-preset.txt, verbatim (18 values: BASE, D00-D16, then the last value)
    "FLUX-DBL-FRONT": "1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "FLUX-DBL-MID": "0,0,0,0,0,0,1,1,1,1,1,1,0,0,0,0,0,0",
    "FLUX-DBL-TAIL": "0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1",
}

_UNET = re.compile(r"^unet\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_MID = re.compile(r"^unet\.mid_block\.(resnets|attentions)\.(\d+)\.")
_FLUX = (
    (re.compile(r"^transformer\.transformer_blocks\.(\d+)\."), "D"),
    (re.compile(r"^transformer\.single_transformer_blocks\.(\d+)\."), "S"),
    (re.compile(r"^diffusion_model\.double_blocks\.(\d+)\."), "D"),
    (re.compile(r"^diffusion_model\.single_blocks\.(\d+)\."), "S"),
)


def block_of(key: str) -> str:
    """The block of a canonical module key: ``IN05``, ``M01``, ``OUT03``, ``D07``, ``S12`` or ``BASE``."""
    m = _UNET.match(key + ".")
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if side == "down_blocks":
            return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{1 + 3 * i + j:02d}"
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    m = _MID.match(key + ".")
    if m:
        return "M01" if m.group(1) == "attentions" else ("M00" if m.group(2) == "0" else "M02")
    if key.startswith("unet.conv_in"):
        return "IN00"
    for pat, p in _FLUX:
        m = pat.match(key + ".")
        if m:
            return f"{p}{int(m.group(1)):02d}"
    return "BASE"


def parse_vector(spec: str) -> List[float]:
    """``"1,0,0.5,..."``, a preset name, or ``"NAME:1,0,..."`` (Inspire's line format) -> floats."""
    s = spec.strip()
    if s in PRESETS:
        s = PRESETS[s]
    elif ":" in s:
        s = s.split(":", 1)[1]
    out = []
    for part in s.replace(" ", "").split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise InvalidParameterError(
                f"block weights {spec!r}: {part!r} is not a number (give numbers separated by commas "
                f"or a preset name: {', '.join(sorted(PRESETS))})") from None
    return out


def layout_for(n: int, base_model: Optional[str]) -> List[str]:
    return _layout(n, base_model)[1]


def _layout(n: int, base_model: Optional[str]):
    fam = FAMILY_OF.get(base_model or "")
    cands = [(f, LAYOUTS[f][n]) for f in ([fam] if fam else list(LAYOUTS)) if n in LAYOUTS[f]]
    if len(cands) != 1:
        lens = "; ".join(f"{f}: {', '.join(map(str, sorted(LAYOUTS[f])))}" for f in ([fam] if fam else LAYOUTS))
        why = "fits more than one model family" if cands else "fits no layout"
        raise InvalidParameterError(f"a block-weight vector of {n} values {why} "
                                    f"(base model {base_model or 'unknown'}; lengths per family: {lens})")
    return cands[0]


def block_multiplier(spec, base_model: Optional[str] = None) -> Callable[[str], float]:
    """key -> factor for one input, from a vector (string or floats) and the input's base model."""
    vec = parse_vector(spec) if isinstance(spec, str) else [float(x) for x in spec]
    family, labels = _layout(len(vec), base_model)
    table: Dict[str, float] = {}
    for label, v in zip(labels, vec):
        for b in (MID if label == "MID" else (label,)):
            table[b] = v
    for label in CONTINUES.get(family, [])[len(labels):]:
        table[label] = vec[-1]

    def factor(key: str) -> float:
        return table.get(block_of(key), 1.0)

    factor.table = table      # type: ignore[attr-defined]
    return factor




def strength_multiplier(model: float, clip: float, blocks=None, base_model: Optional[str] = None
                        ) -> "tuple[float, Optional[Callable[[str], float]]]":
    """(weight, multiplier) for one input with separate model / CLIP strengths and optional block
    weights: the text-encoder modules end at ``clip`` (× BASE), the others at ``model`` × their block's
    factor. None as multiplier when it would be 1 everywhere."""
    bm = block_multiplier(blocks, base_model) if blocks not in (None, "") else None
    if bm is None and clip == model:
        return model, None
    weight = model if model != 0 else (clip if clip != 0 else 1.0)

    def factor(key: str) -> float:
        s = clip if is_text_encoder(key) else model
        return (s / weight) * (bm(key) if bm else 1.0)

    factor.spec = (model, clip, None if blocks is None else str(blocks), base_model)   # type: ignore[attr-defined]
    return weight, factor


def combine(mults: Sequence[Optional[Callable[[str], float]]]) -> Optional[List[Optional[Callable[[str], float]]]]:
    """None when no input has a multiplier (the engine's fast path)."""
    return None if all(m is None for m in mults) else list(mults)


def weights_and_multipliers(strengths: Sequence[float], clip_strengths: Sequence[Optional[float]],
                            block_specs: Sequence[Optional[object]], base_models: Sequence[Optional[str]]
                            ) -> "tuple[List[float], Optional[List[Optional[Callable[[str], float]]]]]":
    """Per input (model strength, CLIP strength or None = the same, block weights or None, base model)
    -> ``merge(weights=..., multipliers=...)`` arguments (multipliers None when all are 1)."""
    ws, ms = [], []
    for s, c, b, base in zip(strengths, clip_strengths, block_specs, base_models):
        w, m = strength_multiplier(float(s), float(s if c is None else c), b, base)
        ws.append(w)
        ms.append(m)
    return ws, combine(ms)
