"""Header-level reading, without torch: tensor names, shapes, dtypes and alpha values in, a plan of
canonical modules out. ``reader.build_lora`` wraps the plan into a lazy :class:`~domerge_core.lora.Lora`;
``inspect.describe`` uses it directly, so ``domerge inspect`` needs neither torch nor tensor data."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import LoraFormatError, UnsupportedFormatError
from . import lycoris, lycoris_base, peft_adapters
from .canonical import PIPELINE_COMPONENTS, Rows, file_hint, rows_count
from .dtypes import FLOAT_CODES
from .keys import ModuleKeys, group_keys
from .names import Mapped, map_name, peft_relative_path

MAX_ALPHA = 1e6          # larger alphas only come from damaged files; their squares overflow fp32 Grams


class TensorSource:
    """What the reader needs from a file or a state dict: shapes and dtypes (safetensors names) up
    front, alpha values and tensors on demand."""

    def __init__(self, label: str, shapes: Mapping[str, Tuple[int, ...]], dtypes: Mapping[str, str],
                 get: Optional[Callable[[str], Any]] = None, scalar: Optional[Callable[[str], float]] = None):
        self.label = label
        self.shapes = shapes
        self.dtypes = dtypes
        self.get = get                # key -> torch.Tensor
        self.scalar = scalar          # key -> float (alphas); defaults to get(key)

    def keys(self):
        return self.shapes.keys()


# ----------------------------------------------------------------------------------------------
# PEFT configs: lora_adapter_metadata (diffusers) / adapter_config.json (PEFT)
# ----------------------------------------------------------------------------------------------
class _Pattern:
    """A PEFT ``rank_pattern``/``alpha_pattern`` key, matched as PEFT does (``re.match(r"(.*\\.)?(KEY)$",
    path)``) but without a backtracking regex engine: keys come from the file, and a key such as
    ``(a*)*b`` would hang ``re`` for minutes. Supported: literal text, ``.``, ``\\.``-style escapes,
    ``\\d \\w \\s``, ``[...]`` classes, ``.*``/``X*``/``X+``/``X?`` on one character, top-level ``|`` and
    a trailing ``$``; each alternative is matched by a linear-time wildcard scan. Anything else
    (groups, counted repeats, back-references, look-arounds) is refused with an error naming the key."""

    MAX_LEN = 1024

    def __init__(self, text: str):
        if not isinstance(text, str) or not text or len(text) > self.MAX_LEN:
            raise ValueError("must be a non-empty string of at most 1024 characters")
        self.alts = [self._parse(a) for a in self._split(text)]
        # no quantifier: Python's re is linear here (fixed-length alternatives after "(.*\.)?")
        fixed = all(q == "" for alt in self.alts for _, q in alt)
        self.rx = re.compile(rf"(.*\.)?({text})$") if fixed else None
        self.compiled = [self._compile(a) for a in self.alts]

    @staticmethod
    def _split(text: str) -> List[str]:
        out, cur, i, cls = [], "", 0, False
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                cur += text[i:i + 2]
                i += 2
                continue
            if c == "[":
                cls = True
            elif c == "]":
                cls = False
            if c == "|" and not cls:
                out.append(cur)
                cur = ""
            else:
                cur += c
            i += 1
        out.append(cur)
        return out

    _ESC = {"d": set("0123456789"), "w": set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"),
            "s": set(" \t\n\r\f\v")}

    def _parse(self, text: str):
        atoms: List[Tuple[Any, str]] = []       # (predicate, quantifier "" | "*" | "+" | "?")
        i = 0
        if text.endswith("$") and not text.endswith("\\$"):
            text = text[:-1]
        if text.startswith("^"):
            text = text[1:]
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 >= len(text):
                    raise ValueError("ends with a backslash")
                e = text[i + 1]
                if e in self._ESC:
                    atom = ("in", frozenset(self._ESC[e]))
                elif e.isalnum():
                    raise ValueError(f"uses the escape \\{e}, which domerge does not evaluate")
                else:
                    atom = ("lit", e)
                i += 2
            elif c == "[":
                j = i + 1
                neg = j < len(text) and text[j] == "^"
                j += neg
                chars = set()
                start = j
                while j < len(text) and (text[j] != "]" or j == start):
                    if text[j] == "\\" and j + 1 < len(text):
                        e = text[j + 1]
                        chars |= self._ESC.get(e, {e})
                        j += 2
                    elif j + 2 < len(text) and text[j + 1] == "-" and text[j + 2] != "]":
                        lo, hi = ord(text[j]), ord(text[j + 2])
                        if hi < lo or hi - lo > 0x3000:
                            raise ValueError("has an invalid character range")
                        chars |= {chr(x) for x in range(lo, hi + 1)}
                        j += 3
                    else:
                        chars.add(text[j])
                        j += 1
                if j >= len(text):
                    raise ValueError("has an unclosed [")
                atom = ("out" if neg else "in", frozenset(chars))
                i = j + 1
            elif c == ".":
                atom = ("any", "")
                i += 1
            elif c in "()*+?{}^$":
                raise ValueError(f"uses {c!r} where domerge evaluates only names, '.', '[...]', '|' and "
                                 f"'*', '+', '?' after one character")
            else:
                atom = ("lit", c)
                i += 1
            q = ""
            if i < len(text) and text[i] in "*+?":
                q = text[i]
                i += 1
                if i < len(text) and text[i] in "*+?{":
                    raise ValueError("has a repeated quantifier")
            atoms.append((atom, q))
        return atoms

    @staticmethod
    def _one(atom, ch: str) -> bool:
        kind, arg = atom
        if kind == "any":
            return ch != "\n"
        if kind == "lit":
            return ch == arg
        if kind == "in":
            return ch in arg
        return ch not in arg

    def _compile(self, atoms):
        """Shift-And bit masks of one alternative: bit k = "atom k is next"."""
        loop = sum(1 << k for k, (_, q) in enumerate(atoms) if q in ("*", "+"))
        opt = sum(1 << k for k, (_, q) in enumerate(atoms) if q in ("*", "?"))
        return atoms, loop, opt, {}

    @staticmethod
    def _close(x: int, opt: int) -> int:
        while True:
            add = ((x & opt) << 1) & ~x
            if not add:
                return x
            x |= add

    def _run(self, compiled, path: str) -> bool:
        """PEFT's ``(.*[.])?(KEY)$``: the key may start at 0 or after any "."; linear in the path."""
        atoms, loop, opt, cache = compiled
        n = len(atoms)
        start = self._close(1, opt)
        cur = start
        for ch in path:
            acc = cache.get(ch)
            if acc is None:
                acc = cache[ch] = sum(1 << k for k, (a, _) in enumerate(atoms) if self._one(a, ch))
            hit = cur & acc
            cur = self._close((hit << 1) | (hit & loop), opt)
            if ch == ".":
                cur |= start
        return bool(cur >> n & 1)

    def match(self, path: str) -> bool:
        if self.rx is not None:
            return self.rx.match(path) is not None
        return any(self._run(c, path) for c in self.compiled)


def _number(v, what: str, label: str, *, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
            or (positive and float(v) <= 0) or abs(float(v)) > 1e12:
        raise LoraFormatError(f"adapter config: {what} must be a positive finite number, not "
                              f"{_show(v)}", file=label, key=what)
    return float(v)


def _show(v) -> str:
    from ..errors import escape_controls
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    s = escape_controls(s)
    return s if len(s) <= 40 else s[:37] + "..."


class PeftScale:
    """Scale rule of a LoraConfig: ``lora_alpha / r`` (rsLoRA: ``/ √r``) with per-module patterns.
    Every field is type-checked: a wrong JSON type is a one-line error naming the config and key."""

    def __init__(self, cfg: Mapping[str, Any], label: str = "adapter config"):
        self.label = label
        a = cfg.get("lora_alpha")
        self.alpha = None if a is None else _number(a, "lora_alpha", label)
        r = cfg.get("r")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 0 < r < 1 << 31):
            raise LoraFormatError(f"adapter config: r must be a positive integer, not {_show(r)}", file=label,
                                  key="r")
        self.r = r
        rs = cfg.get("use_rslora", False)
        if rs is None:
            rs = False
        if not isinstance(rs, bool):
            raise LoraFormatError(f"adapter config: use_rslora must be true or false, not {_show(rs)}",
                                  file=label, key="use_rslora")
        self.rslora = rs
        fifo = cfg.get("fan_in_fan_out", False)
        self.fan_in_fan_out = fifo is True
        dora = cfg.get("use_dora")
        if dora is not None and not isinstance(dora, bool):
            raise LoraFormatError(f"adapter config: use_dora must be true or false, not {_show(dora)}",
                                  file=label, key="use_dora")
        self.dora = bool(dora)       # PEFT DoRA: its lora_magnitude_vector tensors are read with a base
        self.rank_pattern = self._patterns(cfg, "rank_pattern", integer=True)
        self.alpha_pattern = self._patterns(cfg, "alpha_pattern", integer=False)

    def _patterns(self, cfg, name: str, integer: bool):
        raw = cfg.get(name)
        if raw is None:
            return []
        if not isinstance(raw, dict):
            raise LoraFormatError(f"adapter config: {name} must be a JSON object, not {_show(raw)}",
                                  file=self.label, key=name)
        if len(raw) > 100_000:
            raise LoraFormatError(f"adapter config: {name} has {len(raw):,} entries", file=self.label, key=name)
        out = []
        for k, v in raw.items():
            if integer:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 31:
                    raise LoraFormatError(f"adapter config: {name}[{_show(k)}] must be a positive integer, "
                                          f"not {_show(v)}", file=self.label, key=name)
            else:
                _number(v, f"{name}[{_show(k)}]", self.label)
            try:
                pat = _Pattern(k)
            except ValueError as e:
                raise LoraFormatError(f"adapter config: {name} key {_show(k)} {e}", file=self.label,
                                      key=name) from None
            out.append((pat, v))
        if sum(p.rx is None for p, _ in out) > 256:
            raise LoraFormatError(f"adapter config: {name} has more than 256 keys with '*', '+' or '?'",
                                  file=self.label, key=name)
        return out

    @staticmethod
    def _match(patterns, path: str):
        for p, v in patterns:
            if p.match(path):
                return v
        return None

    def scale(self, paths: List[str], rank: int) -> float:
        alpha = None
        for path in paths:
            alpha = self._match(self.alpha_pattern, path)
            if alpha is not None:
                break
        if alpha is None:
            alpha = self.alpha
        if alpha is None:
            return 1.0
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)


def _configs_from_metadata(metadata: Mapping[str, str], label: str = "") -> Dict[str, Dict[str, Any]]:
    """``lora_adapter_metadata`` -> {component or "": config}. diffusers writes flat ``unet.r`` keys."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    from .safetensors import safe_json_loads
    try:
        obj = safe_json_loads(raw, max_objects=10_000, what="lora_adapter_metadata")
    except ValueError as e:
        if str(e) == "lora_adapter_metadata is not valid JSON":
            return {}
        raise LoraFormatError(str(e), file=label, key="lora_adapter_metadata") from None
    if not isinstance(obj, dict):
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and k in PIPELINE_COMPONENTS:
            out.setdefault(k, {}).update(v)
            continue
        comp, dot, name = k.partition(".")
        if dot and comp in PIPELINE_COMPONENTS:
            out.setdefault(comp, {})[name] = v
        else:
            out.setdefault("", {})[k] = v
    return out


CONFIG_SOURCE = "__domerge_config_file__"
MAX_CONFIG_BYTES = 16 << 20


def read_adapter_config(adapter_config) -> Optional[Dict[str, Any]]:
    if adapter_config is None:
        return None
    if isinstance(adapter_config, Mapping):
        return dict(adapter_config)
    if not isinstance(adapter_config, (str, os.PathLike)):
        raise LoraFormatError(f"adapter_config must be a path or a dict, not {type(adapter_config).__name__}")
    path = os.fspath(adapter_config)
    from .safetensors import open_regular, safe_json_loads
    fd, st = open_regular(path, what="adapter config")
    try:
        if st.st_size > MAX_CONFIG_BYTES:
            raise LoraFormatError(f"adapter config of {st.st_size:,} bytes; a real one has a few KB", file=path)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise LoraFormatError(f"cannot read adapter config: {e.strerror or e}", file=path) from None
    finally:
        os.close(fd)
    try:
        obj = safe_json_loads(data.decode("utf-8"), max_objects=100_000, what="adapter config")
    except UnicodeDecodeError:
        raise LoraFormatError("adapter config is not UTF-8 JSON", file=path) from None
    except ValueError as e:
        raise LoraFormatError(f"cannot read adapter config: {e}", file=path) from None
    if not isinstance(obj, dict):
        raise LoraFormatError("adapter config is not a JSON object", file=path)
    obj[CONFIG_SOURCE] = path
    return obj


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
def _check_float(src: TensorSource, key: str) -> None:
    dt = src.dtypes.get(key)
    if dt not in FLOAT_CODES:
        raise LoraFormatError(f"tensor has dtype {dt}, expected a float type", file=src.label, key=key)


def _module_geometry(src: TensorSource, g: ModuleKeys):
    """(out, in, rank, kernel or None) from shapes only; raises on any inconsistency."""
    up_k, down_k, mid_k = g.keys["up"], g.keys["down"], g.keys.get("mid")
    up, down = tuple(src.shapes[up_k]), tuple(src.shapes[down_k])
    for k in (up_k, down_k) + ((mid_k,) if mid_k else ()):
        _check_float(src, k)
    if len(down) not in (2, 4) or len(up) not in (2, 4):
        raise LoraFormatError(f"unexpected factor shapes up {list(up)} / down {list(down)} for module "
                              f"{g.name!r}", file=src.label, key=up_k if len(up) not in (2, 4) else down_k)
    if len(up) == 4 and tuple(up[2:]) != (1, 1):
        raise UnsupportedFormatError(f"up factor with a {up[2]}x{up[3]} kernel is not supported (module "
                                     f"{g.name!r})", file=src.label, key=up_k)
    rank = down[0]
    if mid_k:
        mid = tuple(src.shapes[mid_k])
        if len(mid) != 4 or mid[0] != up[1] or mid[1] != rank or len(down) != 4 or tuple(down[2:]) != (1, 1):
            raise LoraFormatError(f"inconsistent Tucker shapes up {list(up)} / mid {list(mid)} / down "
                                  f"{list(down)}", file=src.label, key=mid_k)
        rank = mid[0]
        kernel = tuple(mid[2:])
        in_features = down[1] * kernel[0] * kernel[1]
    else:
        kernel = tuple(down[2:]) if len(down) == 4 else None
        in_features = down[1] * (kernel[0] * kernel[1] if kernel else 1)
    if up[1] != rank:
        raise LoraFormatError(f"shape mismatch in module {g.name!r}: up {list(up)} has rank {up[1]} but "
                              f"down {list(down)} has rank {down[0]}", file=src.label, key=up_k)
    if rank == 0:
        raise LoraFormatError(f"module {g.name!r} has rank 0", file=src.label, key=down_k)
    if rank > min(up[0], in_features):
        raise LoraFormatError(f"module {g.name!r} has rank {rank}, more than its layer "
                              f"({up[0]}x{in_features}) can hold: not a LoRA of this layer", file=src.label,
                              key=down_k)
    return up[0], in_features, rank, kernel


def _alpha(src: TensorSource, key: str) -> float:
    dt = src.dtypes.get(key)
    if dt in ("BOOL", "F8_E4M3", "F8_E5M2") or (isinstance(dt, str) and ("bool" in dt or "float8" in dt)):
        raise LoraFormatError(f"alpha stored as {dt}; expected a float or integer scalar", file=src.label, key=key)
    shape = tuple(src.shapes[key])
    n = 1
    for s in shape:
        n *= s
    if n != 1:
        raise LoraFormatError(f"alpha must be a scalar, got shape {list(shape)}", file=src.label, key=key)
    v = float(src.scalar(key)) if src.scalar else float(src.get(key).reshape(()).double())
    if not math.isfinite(v):
        raise LoraFormatError(f"alpha is {v} (not finite)", file=src.label, key=key)
    if v <= 0:
        raise LoraFormatError(f"alpha is {v:g}; loaders disagree on what a non-positive alpha means "
                              f"(kohya reads 0 as alpha = rank, ComfyUI as scale 0)", file=src.label, key=key)
    if v > MAX_ALPHA:
        raise LoraFormatError(f"alpha is {v:g}, implausibly large (a LoRA's alpha is of the order of its "
                              f"rank); the file is probably damaged", file=src.label, key=key)
    return v


@dataclass
class ModulePlan:
    key: str
    kind: str
    out_features: int
    in_features: int
    rank: int
    scale: float
    kernel_size: Optional[Tuple[int, ...]]
    group: ModuleKeys                     # the file's keys of this module
    rows: Rows                            # its rows of the file's up factor (canonical.Rows) or None: all
    dtype: str                            # safetensors dtype name of the factors
    lora_scale: Optional[float] = None    # DoRA: the LoRA's own scale (``scale`` is then 1: dense ΔW)
    oft_alpha: Optional[float] = None     # OFT/BOFT (dense ΔW from the base weight): constraint alpha (0: none)
    peft: Optional[peft_adapters.PeftSpec] = None   # PEFT DoRA / OFT / BOFT (dense ΔW from the base weight)
    alpha: Optional[float] = None         # the file's ``.alpha`` value, if it has one (inspect shows it)
    fused_rows: Optional[int] = None      # a part of a fused module: the fused weight's row count


def _base_weight_shape(src: TensorSource, g: ModuleKeys, mapped: Mapped, base_shape, what: str,
                       key: str, fused_ok: bool = False) -> Tuple[int, ...]:
    """The shape of the base weight a base-dependent module (OFT/BOFT/GLoRA, PEFT OFT/BOFT) patches,
    from the base's header when ``base_shape`` reads one: a clear error naming the file and key otherwise.
    A fused module (``fused_ok``: several targets, or rows in another order) patches its parts' base
    rows stacked back in the file's row order, each part asked for by its canonical key."""
    fused = len(mapped.targets) != 1 or mapped.targets[0][1] is not None
    if fused and not fused_ok:
        raise UnsupportedFormatError(f"{what} on a fused module (split into several) is not supported",
                                     file=src.label, key=key)
    shapes = []
    for k, rows in mapped.targets:
        shape = base_shape(k, k if fused else g.name) if base_shape else None
        if shape is None:
            raise LoraFormatError(f"{what} module: its base weight{f' ({k})' if fused else ''} was not found in "
                                  f"the given base model", file=src.label, key=key)
        shape = tuple(int(x) for x in shape)
        if len(shape) not in (2, 4):
            raise LoraFormatError(f"{what} module: the base weight has shape {list(shape)}, not a linear or "
                                  f"conv weight", file=src.label, key=key)
        if fused and (shape[0] != rows_count(rows, shape[0]) or (shapes and shape[1:] != shapes[0][1:])):
            raise LoraFormatError(f"{what} module: the base weight of {k} has shape {list(shape)}, which does "
                                  f"not fit its rows of the fused module", file=src.label, key=key)
        shapes.append(shape)
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _base_geometry(src: TensorSource, g: ModuleKeys, mapped: Mapped, base_shape) -> "lycoris_base.BaseGeometry":
    """An OFT / BOFT / GLoRA module checked against its base weight's shape."""
    key = g.keys.get("oft_blocks") or g.keys["a1"]
    shape = _base_weight_shape(src, g, mapped, base_shape, lycoris.NAMES[g.family], key, fused_ok=True)
    scalar = src.scalar or (lambda k: float(src.get(k).reshape(()).double()))
    return lycoris_base.geometry(src, g, shape, scalar)


@dataclass
class FilePlan:
    modules: Dict[str, ModulePlan]
    format: str
    layout: Dict[str, str]
    metadata: Dict[str, str]
    dtype: str
    base_model: Optional[str]


def _config_of(configs: Mapping[str, Any], mapped: Mapped):
    """The adapter config of a module's component (diffusers' per-component metadata), else the file's."""
    comp = mapped.targets[0][0].split(".", 1)[0]
    return configs.get(comp) or configs.get("")


def plan_modules(src: TensorSource, metadata: Optional[Mapping[str, str]] = None, *,
                 adapter_config: Optional[Mapping[str, Any]] = None, allow_dora: bool = False,
                 base_shape: Optional[Callable[[str, str], Optional[Tuple[int, ...]]]] = None) -> FilePlan:
    metadata = dict(metadata or {})
    groups = group_keys(src.keys(), src.label, allow_dora=allow_dora)
    cfgs = _configs_from_metadata(metadata, src.label)
    labels = {k: src.label for k in cfgs}
    if adapter_config:
        adapter_config = dict(adapter_config)
        cfg_file = adapter_config.pop(CONFIG_SOURCE, None)
        cfgs.setdefault("", {}).update(adapter_config)
        labels[""] = cfg_file or src.label
    rotations = {k: peft_adapters.RotationConfig.from_config(v, labels.get(k, src.label))
                 for k, v in cfgs.items() if peft_adapters.rotation_type(v)}
    scales = {k: PeftScale(v, labels.get(k, src.label)) for k, v in cfgs.items() if k not in rotations}
    hint = file_hint(g.name for g in groups)   # Flux / SD3: their modules outside the blocks get diffusers names
    modules: Dict[str, ModulePlan] = {}
    formats: Counter = Counter()
    layout: Dict[str, str] = {}
    bases: Counter = Counter()
    dtypes: Counter = Counter()
    for g in groups:
        lycoris_base.refine_family(src, g)
        lyco = g.family in lycoris.FAMILIES
        rot_fam = g.family in peft_adapters.FAMILIES
        based = g.family in lycoris_base.FAMILIES      # OFT / BOFT / GLoRA: geometry from the base weight
        peft_spec = None
        if rot_fam:           # PEFT OFT / BOFT: the geometry is the base weight's
            for k in g.keys.values():
                _check_float(src, k)
            mapped = map_name(g.name, "ab", 0, hint=hint)
            shape = _base_weight_shape(src, g, mapped, base_shape, peft_adapters.NAMES[g.family],
                                       next(iter(g.keys.values())))
            rot = _config_of(rotations, mapped)
            out_f, in_f, rank, kernel = peft_adapters.rotation_geometry(src, g, shape, rot)
            peft_spec = peft_adapters.PeftSpec("oft" if g.family == "peft_oft" else "boft", rotation=rot)
        elif lyco:
            for k in g.keys.values():
                if k != g.keys.get("alpha"):
                    _check_float(src, k)
            if based:
                out_f, in_f, rank, kernel, divisor = lycoris_base.rows(src, g), None, None, None, None
            else:
                out_f, in_f, rank, kernel, divisor = lycoris.geometry(
                    src, g.name, g.family, {r: k for r, k in g.keys.items() if r != "alpha"})
        else:
            out_f, in_f, rank, kernel = _module_geometry(src, g)
        if not rot_fam:
            mapped = map_name(g.name, "down_up" if lyco else g.family, out_f, in_f, hint)
        oft_alpha = None
        if based:                     # dense ΔW (OFT/BOFT) or exact factors (GLoRA) from the base weight
            bg = _base_geometry(src, g, mapped, base_shape)
            out_f, in_f, kernel, rank = bg.out_features, bg.in_features, bg.kernel, bg.rank
            divisor, oft_alpha = bg.divisor, bg.constraint
        elif lyco and kernel is None:
            kernel = lycoris.conv_kernel_hint(mapped.targets[0][0], in_f)
        formats[mapped.format] += 1
        for k, v in mapped.layout.items():
            layout.setdefault(k, v)
        if mapped.base_hint:
            bases[mapped.base_hint] += 1
        alpha = None              # the file's alpha value (OFT/BOFT: their norm constraint), for inspect
        if "alpha" in g.keys and not rot_fam:
            alpha = oft_alpha if g.family in ("oft", "boft") else \
                _alpha(src, g.keys["alpha"]) if (not lyco or divisor) else None
        if rot_fam:
            scale = 1.0
        elif lyco:     # ComfyUI's rules: alpha / (inner size of a stored factor pair), else 1 (OFT, diff: 1)
            scale = alpha / divisor if alpha is not None and divisor else 1.0
        elif alpha is not None:
            scale = alpha / rank
        elif g.family in ("ab", "old") and scales:     # old attention-processor names too: diffusers
            rule = _config_of(scales, mapped)           # renames them to lora_A/B and applies the config
            rel = peft_relative_path(g.name)
            paths = [rel, mapped.targets[0][0].split(".", 1)[1]]
            if rel.startswith("text_model."):
                paths.append(rel[len("text_model."):])
            scale = rule.scale(paths, rank) if rule else 1.0
        else:
            scale = 1.0
        dt = src.dtypes[g.keys["up"] if not (lyco or rot_fam) else next(iter(g.keys.values()))]
        dtypes[dt] += 1
        lora_scale = None
        if g.family == "ab" and not rot_fam and scales:
            rule = _config_of(scales, mapped)
            if rule is not None and rule.dora and "magnitude" not in g.keys:
                raise UnsupportedFormatError("format found: PEFT DoRA (use_dora) without a lora_magnitude_vector "
                                             "for this module", file=src.label, key=g.keys["down"])
        if "magnitude" in g.keys:           # PEFT DoRA: dense update from the base weight
            mk = g.keys["magnitude"]
            _check_float(src, mk)
            if len(mapped.targets) != 1 or mapped.targets[0][1] is not None:
                raise UnsupportedFormatError("PEFT DoRA on a fused module (split into several) is not supported",
                                             file=src.label, key=mk)
            if any(r.fan_in_fan_out for r in scales.values()):
                raise UnsupportedFormatError("format found: PEFT DoRA with fan_in_fan_out (Conv1D layers) is not "
                                             "read", file=src.label, key=mk)
            peft_spec = peft_adapters.PeftSpec("dora", lora_scale=scale)
            scale, rank = 1.0, min(out_f, in_f)
        elif "dora_scale" in g.keys:          # dense update from the base weight, exact at rank min(m, n)
            _check_float(src, g.keys["dora_scale"])     # a fused module: decomposed whole, then split by rows
            # ComfyUI's weight_decompose multiplies the adapter's update by the alpha it is given: the
            # scale for LoRA/LoHa/LoKr/GLoRA, but OFT/BOFT pass their norm constraint (OFT: 0 if none)
            lora_scale = oft_alpha if g.family in ("oft", "boft") else scale
            scale, rank = 1.0, min(out_f, in_f)
        for key, rows in mapped.targets:
            part_rank = rank
            if rows is not None and (lora_scale is not None or based):   # its rows of the fused update
                part_rank = min(rank, rows_count(rows, out_f), in_f)
            if key in modules:
                raise LoraFormatError(f"two entries map to the same module {key!r}", file=src.label,
                                      key=g.keys.get("down") or next(iter(g.keys.values())))
            modules[key] = ModulePlan(key=key, kind="conv" if kernel else "linear",
                                      out_features=rows_count(rows, out_f), in_features=in_f,
                                      rank=part_rank, scale=scale, kernel_size=kernel, group=g, rows=rows, dtype=dt,
                                      lora_scale=lora_scale, oft_alpha=oft_alpha, peft=peft_spec, alpha=alpha,
                                      fused_rows=out_f if rows is not None else None)
    if formats.get("diffusers") and formats.get("diffusers_old"):
        # diffusers files written for ComfyUI too keep the UNet in attention-processor names
        formats["diffusers"] += formats.pop("diffusers_old")
    fmt = formats.most_common(1)[0][0]
    layout.setdefault("format", {"comfy": "kohya", "diffusers_old": "diffusers", "xlabs": "kohya"}.get(fmt, fmt))
    base = guess_base_model(metadata, layout, {k: m.in_features for k, m in modules.items()}, bases)
    return FilePlan(modules=modules, format=fmt, layout=layout, metadata=metadata,
                    dtype=dtypes.most_common(1)[0][0], base_model=base)


def guess_base_model(metadata: Mapping[str, str], layout: Mapping[str, str], in_features: Mapping[str, int],
                     hints: Optional[Counter] = None) -> Optional[str]:
    """"sd1" / "sd2" / "sdxl" / "flux" / "sd3" / "llm" / None, from metadata, then names, then shapes.
    ``in_features``: canonical key -> input width."""
    md = metadata
    v = (md.get("ss_base_model_version") or "").lower()
    arch = (md.get("modelspec.architecture") or "").lower()
    for needle, name in (("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("flux", "flux"),
                         ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"), ("sd_v2", "sd2"),
                         ("stable-diffusion-v2", "sd2"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3")):
        if needle in v or needle in arch:
            return name
    if hints:
        return hints.most_common(1)[0][0]
    keys = in_features
    if any(k.startswith("text_encoder_2.") for k in keys) or layout.get("unet_names") == "sgm":
        return "sdxl"
    cross = [n for k, n in keys.items() if k.startswith("unet.") and k.endswith("attn2.to_k")]
    if cross:
        c = Counter(cross).most_common(1)[0][0]
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(c)
    if any(k.startswith("transformer.single_transformer_blocks.") for k in keys):
        return "flux"
    if _is_sd3(keys):
        return "sd3"
    if any(k.startswith("model.") for k in keys):
        return "llm"
    return None


_JOINT = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.(attn\.add_[qkv]_proj|attn\.to_add_out|ff_context\.|"
                    r"norm1_context\.|attn2\.|attn\.to_q$)")


def _is_sd3(in_features: Mapping[str, int]) -> bool:
    """A diffusers-named SD3/SD3.5 transformer (no Flux single blocks): joint-attention blocks
    (``add_q_proj``, ``to_add_out``, ``ff_context``, ``norm1_context``) and SD3 evidence: SD3.5's
    ``attn2`` in a joint block, SD3's ``pos_embed.proj``, or a hidden width of 64 per block (SD3's
    rule: 24 blocks of 1536, SD3.5-large 38 of 2432; Flux has 19 double blocks of 3072, Qwen-Image 60
    of 3072, HunyuanVideo 20 of 3072)."""
    blocks, joint, attn2, width = set(), False, False, set()
    for k, n in in_features.items():
        m = _JOINT.match(k)
        if not m:
            continue
        blocks.add(int(m.group(1)))
        sub = m.group(2)
        attn2 |= sub.startswith("attn2.")
        joint |= not sub.startswith(("attn2.", "attn.to_q"))
        if sub in ("attn.to_q", "attn.add_q_proj"):
            width.add(n)
    if not joint:
        return False
    depth = max(blocks) + 1
    return attn2 or "transformer.pos_embed.proj" in in_features or width == {64 * depth}
