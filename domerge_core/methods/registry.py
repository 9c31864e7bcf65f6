"""One registry of merge methods and their declared parameters.

The CLI, the ComfyUI nodes and the widgets build their controls from this registry alone: a new
method is one module in ``methods/`` that calls `register`, and every adapter shows it.

Parameters shared by every method (the "plug-ins" of DO-Merging: decouple, orthogonalize and their
options) are declared once in `PLUGIN_PARAMS`; `MethodSpec.all_params()` returns the method's own
parameters followed by those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import InvalidParameterError


@dataclass(frozen=True)
class Param:
    name: str                      # python/CLI name, snake_case ("density"; CLI flag --density)
    type: str                      # "float" | "int" | "bool" | "choice"
    default: Any
    help: str = ""
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    choices: Tuple[str, ...] = ()
    label: str = ""                # short UI label; defaults to name

    def validate(self, value: Any) -> Any:
        try:
            if self.type == "float":
                value = float(value)
            elif self.type == "int":
                value = int(value)
            elif self.type == "bool":
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                value = bool(value)
            elif self.type == "choice":
                value = str(value)
                if value not in self.choices:
                    raise ValueError(f"must be one of {', '.join(self.choices)}")
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidParameterError(f"parameter {self.name}: {str(value)[:40]!r}: {e}") from None
        if self.type in ("float", "int"):
            if value != value:  # NaN
                raise InvalidParameterError(f"parameter {self.name}: NaN is not allowed")
            if self.min is not None and value < self.min:
                raise InvalidParameterError(f"parameter {self.name}={value} is below its minimum {self.min}")
            if self.max is not None and value > self.max:
                raise InvalidParameterError(f"parameter {self.name}={value} is above its maximum {self.max}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    name: str                      # "ta", "ties", "dare", "dare_ties", "do", ...
    label: str                     # human name ("Task arithmetic")
    description: str
    params: Tuple[Param, ...]      # the method's own parameters
    fn: Callable[..., Any]         # implementation; see methods/__init__.py for the calling convention
    lowrank: bool = False          # True: exact low-rank path, never builds an m×n matrix
    # True: the merge is exactly Σ_i up_i·down_i of the tasks it is given (task arithmetic), so the
    # engine may skip the call and apply the factors' R×R transforms on the cheaper side
    linear: bool = False
    defaults_override: Dict[str, Any] = field(default_factory=dict)   # e.g. do: decouple=True

    def all_params(self) -> List[Param]:
        out = list(self.params)
        for p in PLUGIN_PARAMS:
            if p.name in self.defaults_override:
                p = Param(**{**p.__dict__, "default": self.defaults_override[p.name]})
            out.append(p)
        return out

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.all_params()}

    def resolve(self, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Defaults overlaid with ``params``, each validated. Unknown names are an error."""
        specs = {p.name: p for p in self.all_params()}
        out = self.defaults()
        if params is not None and not isinstance(params, Mapping):
            raise InvalidParameterError(f"params must be a dict of parameter values, not {type(params).__name__}")
        for k, v in (params or {}).items():
            if k not in specs:
                raise InvalidParameterError(
                    f"method {self.name!r} has no parameter {k!r} (known: {', '.join(specs)})")
            if v is None:
                continue
            out[k] = specs[k].validate(v)
        return out


# Filled in by methods/plugins.py (decouple / orthogonalize options). Declared here so that
# the registry has no import-order surprises.
PLUGIN_PARAMS: List[Param] = []

_REGISTRY: Dict[str, MethodSpec] = {}

# The method the CLI, the ComfyUI node, the panel and `merge()` start from, with its registered
# defaults; chosen by mean rank on the quality benchmarks' validation splits (why: DEFAULT_WHY).
DEFAULT_METHOD = "do"
DEFAULT_WHY = ("DO-Merging with the norm-preserving recombination (recombine v2) has the best mean rank, "
               "6.42 among the 30 method/option combinations scored in all 12 validation cells of "
               "benchmarks/quality (digits, diffusion × tuned, drop-in × T = 2, 3, all; RESULTS.md)")


def default_method() -> str:
    return DEFAULT_METHOD


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise InvalidParameterError(f"method must be a method name (str), not {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown merge method {name!r} (known: {', '.join(_REGISTRY)})") from None


def list_methods() -> List[MethodSpec]:
    return list(_REGISTRY.values())


def method_names() -> Sequence[str]:
    return tuple(_REGISTRY)
