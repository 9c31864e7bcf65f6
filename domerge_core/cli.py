"""The ``domerge`` command line: argparse over the core's public API and its method registry.

Every deliberate error is one line ``error: <file>: <reason>`` on stderr and exit code 2; no
traceback (``DOMERGE_DEBUG=1`` shows one). Ctrl-C / SIGTERM stop cleanly (exit 130 / 143) and,
like every failure, leave no partial output behind (the writers are atomic).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .formats.dtypes import OUTPUT_CHOICES
from .formats.writers import FORMATS

EXIT_USAGE = 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup path (temp files) runs."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the signal tests in a subprocess
    raise _Terminated()


# ----------------------------------------------------------------------------- output helpers

_open_bar_line = False   # a progress bar left the cursor mid-line on stderr


def _err(msg: str) -> None:
    global _open_bar_line
    if _open_bar_line:
        sys.stderr.write("\n")
        _open_bar_line = False
    from .errors import escape_controls
    print(f"error: {escape_controls(msg)}", file=sys.stderr)


def _escape_lines(text: str) -> str:
    """Multi-line output with control characters inside each line escaped (names come from files)."""
    from .errors import escape_controls
    return "\n".join(escape_controls(line) for line in text.split("\n"))


class ProgressBar:
    """A one-line progress display on stderr (only when stderr is a terminal, unless forced)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = 0.0
        self._stage = None

    def __call__(self, done: int, total: int, stage: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage == self._stage and done < total and now - self._last < 0.1:
            return
        self._last, self._stage = now, stage
        width = 30
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width)
        global _open_bar_line
        _open_bar_line = True          # set before writing: an interrupt may land mid-write
        sys.stderr.write(f"\r{stage:>14s} [{bar:<{width}s}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
            _open_bar_line = False
        sys.stderr.flush()


def _torch_dtype(name: Optional[str]):
    if name is None:
        return None
    from .formats.dtypes import torch_dtype
    return torch_dtype(name)


# ----------------------------------------------------------------------------- inspect

def cmd_inspect(args) -> int:
    import domerge_core as dc

    from .formats.describe import format_description

    # describe() reads headers only (no torch import): fast even on a 1 GB file.
    descs = [dict(dc.describe(p, base=args.base)) for p in args.files]
    analysis = None
    if len(args.files) >= 2 and not args.no_analysis:
        from .formats.base_pipeline import as_base
        base = as_base(args.base)          # the checkpoint's header read once for all files
        loras = [dc.load_lora(p, base=base) for p in args.files]
        dc.check_compatible(loras)
        analysis = dc.analyze(loras, device=args.device)
    if args.json:
        out: Dict[str, Any] = {"files": descs}
        if analysis is not None:
            out["analysis"] = analysis
        print(json.dumps(out, indent=2, default=str))
        return 0
    for d in descs:
        print(format_description(d))
    if analysis is not None:
        from .report.text import render_analysis
        print()
        print(_escape_lines(render_analysis(analysis, [os.path.basename(p) for p in args.files])))
    return 0


# ----------------------------------------------------------------------------- convert

def cmd_convert(args) -> int:
    import domerge_core as dc

    lora = dc.load_lora(args.input)
    fmt = dc.check_loadable(lora, args.format)      # a layout ComfyUI and diffusers load completely
    path = dc.save_lora(lora, args.output, format=fmt, dtype=_torch_dtype(args.dtype), overwrite=args.overwrite)
    from .errors import escape_controls
    print(f"wrote {escape_controls(path)} ({len(lora)} modules, {fmt})")
    return 0


# ----------------------------------------------------------------------------- merge

def _all_params():
    """Union of every registered method's parameters, by name (first declaration wins)."""
    import domerge_core as dc

    seen: Dict[str, Any] = {}
    for spec in dc.list_methods():
        for p in spec.all_params():
            seen.setdefault(p.name, p)
    return seen


def _flag(name: str) -> str:
    return "--lambda" if name == "lam" else "--" + name.replace("_", "-")


def _add_method_params(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("method parameters (defaults depend on --method; see `domerge methods`)")
    for name, p in _all_params().items():
        helptext = (p.help or "").replace("%", "%%")
        if p.type == "bool":
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=helptext)
        elif p.type == "choice":
            group.add_argument(_flag(name), dest=name, choices=list(p.choices), default=None, help=helptext)
        else:
            group.add_argument(_flag(name), dest=name, type=float if p.type == "float" else int, default=None,
                               metavar=name.upper(), help=helptext)


def _parse_weights(text: Optional[str], n: int, flag: str = "--weights") -> Optional[List[float]]:
    """``--weights 0.8,1`` (or ``--clip-weights``) as numbers; the core's own rule (`check_weights`)
    judges them, before any file is read."""
    if text is None:
        return None
    import domerge_core as dc
    try:
        ws = [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SystemExit(_usage_error(f"{flag}: expected numbers separated by commas, got {text!r}"))
    try:
        return dc.check_weights(ws, n)
    except dc.DomergeError as e:
        raise SystemExit(_usage_error(f"{flag}: {e}"))


def _parse_block_weights(specs: Optional[List[str]], n: int) -> List[Optional[str]]:
    """--block-weights given once (every input) or once per input ("-" or "" for none)."""
    if not specs:
        return [None] * n
    if len(specs) not in (1, n):
        raise SystemExit(_usage_error(f"--block-weights: given {len(specs)} times for {n} input files "
                                      f"(give it once for all, or once per input, '-' for none)"))
    out = [None if s.strip() in ("", "-") else s for s in (specs * n if len(specs) == 1 else specs)]
    from .blocks import parse_vector
    from .errors import InvalidParameterError
    for s in out:
        if s is not None:
            try:
                parse_vector(s)
            except InvalidParameterError as e:
                raise SystemExit(_usage_error(f"--block-weights: {e}"))
    return out


def _usage_error(msg: str) -> int:
    _err(msg)
    return EXIT_USAGE


def cmd_merge(args) -> int:
    import domerge_core as dc

    args.method = args.method or dc.default_method()
    spec = dc.get_method(args.method)
    own = {p.name for p in spec.all_params()}
    params = {}
    for name in _all_params():
        v = getattr(args, name, None)
        if v is None:
            continue
        if name not in own:
            return _usage_error(f"{_flag(name)} does not apply to method {args.method!r}")
        params[name] = v
    weights = _parse_weights(args.weights, len(args.inputs))
    from .formats.safetensors import check_outputs
    # every path this command writes, checked before anything is read or written: never an input
    # (nor a file read beside one), never each other, never a FIFO/device/dangling link
    check_outputs([args.output] + ([args.report] if args.report else []), overwrite=args.overwrite,
                  inputs=args.inputs)

    bar = ProgressBar(enabled=not args.quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    clip_weights = _parse_weights(args.clip_weights, len(args.inputs), flag="--clip-weights")
    block_specs = _parse_block_weights(args.block_weights, len(args.inputs))
    from .formats.base_pipeline import as_base
    base = as_base(args.base)          # the checkpoint's header read once for all inputs
    loras = [dc.load_lora(p, base=base) for p in args.inputs]
    if args.format:                  # before the work: a layout these models' clients cannot load
        for lora in loras:
            dc.check_loadable(lora, args.format)
    extra = {}
    if clip_weights is not None or any(block_specs):
        from .blocks import weights_and_multipliers
        weights, mults = weights_and_multipliers(weights or [1.0] * len(loras), clip_weights or [None] * len(loras),
                                                 block_specs, [lo.base_model for lo in loras])
        if mults is not None:
            extra["multipliers"] = mults
    compute = {"fp32": "float32", "fp64": "float64"}[args.compute_dtype]
    import torch
    result = dc.merge(loras, method=args.method, params=params, weights=weights, rank=args.rank,
                      energy=args.energy, device=args.device, compute_dtype=getattr(torch, compute),
                      seed=args.seed, progress=bar, **extra)
    fmt = dc.check_loadable(result.lora, args.format)
    path = result.save(args.output, format=fmt, dtype=_torch_dtype(args.dtype), overwrite=args.overwrite)
    elapsed = time.perf_counter() - t0
    if args.report:
        from .errors import DomergeError
        try:
            _write_json_atomic(args.report, result.report, overwrite=args.overwrite,
                               inputs=[*args.inputs, path])
        except DomergeError as e:   # the merged file is there: say so, not "nothing was written"
            msg = str(e).replace("; nothing was written", "")
            raise DomergeError(f"{msg}; the merged LoRA was written to {path}, the report was not") from None
    if not args.quiet:
        _print_merge_summary(result, path, elapsed)
    return 0


def _write_json_atomic(path: str, data: Any, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    from .formats.safetensors import atomic_write

    payload = json.dumps(data, indent=2, default=str).encode()
    atomic_write(path, lambda f: f.write(payload), overwrite=overwrite, inputs=inputs)


def _print_merge_summary(result, path: str, elapsed: float) -> None:
    from .errors import escape_controls
    from .report.text import render_merge
    print(f"merged {len(result.inputs)} LoRAs with {result.method} -> {escape_controls(path)} in {elapsed:.2f} s")
    print(_escape_lines(render_merge(result.report or {})))


# ----------------------------------------------------------------------------- demo / methods

def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out_dir)
    return 0


def _print_param(p) -> None:
    rng = ""
    if p.type == "choice":
        rng = " {" + ",".join(p.choices) + "}"
    elif p.min is not None or p.max is not None:
        rng = f" [{p.min}, {p.max}]"
    print(f"    {_flag(p.name):<22s} default {p.default!s:<14s}{rng}")
    if p.help:
        print(f"        {p.help}")


def cmd_methods(args) -> int:
    import domerge_core as dc

    from .methods import DEFAULT_WHY
    print(f"default: {dc.default_method()} — {DEFAULT_WHY}\n")
    shared = None
    width = max(len(spec.name) for spec in dc.list_methods()) + 1
    for spec in dc.list_methods():
        print(f"{spec.name:<{width}s} {spec.label}" + ("  [exact low rank]" if spec.lowrank else ""))
        if spec.description:
            print(" " * (width + 1) + spec.description)
        own = {p.name for p in spec.params}
        for p in spec.params:
            _print_param(p)
        plug = [p for p in spec.all_params() if p.name not in own]
        if spec.defaults_override:
            print("    plug-in defaults: " + ", ".join(f"{k}={v}" for k, v in spec.defaults_override.items()))
        shared = plug if shared is None else shared
        print()
    if shared:
        print("plug-ins (every method): decouple and orthogonalize, and their options")
        base = {p.name: p.default for p in dc.get_method("ta").all_params()}
        for p in shared:
            _print_param(type(p)(**{**p.__dict__, "default": base.get(p.name, p.default)}))
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser(method_params: bool = True) -> argparse.ArgumentParser:
    """``method_params=False`` skips the registry (and so the torch import) for other commands."""
    from . import __version__

    ap = argparse.ArgumentParser(prog="domerge", description="Merge LoRAs with DO-Merging "
                                 "(Decouple and Orthogonalize) or the classic methods, exactly and fast.")
    ap.add_argument("--version", action="version", version=f"domerge {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="describe LoRA files (and, for several, how they interfere)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-analysis", action="store_true", help="skip the pairwise analysis of several files")
    p.add_argument("--device", default="auto")
    p.add_argument("--base", default=None, metavar="MODEL.safetensors",
                   help="the base model that OFT/BOFT/GLoRA/DoRA files need (only shapes are read)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="rewrite a LoRA in another layout")
    p.add_argument("input", metavar="IN")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="output layout (default: the input's)")
    p.add_argument("--dtype", choices=list(OUTPUT_CHOICES), default=None, help="output dtype (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="merge LoRAs into one")
    p.add_argument("inputs", nargs="+", metavar="IN")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--method", default=None,
                   help="merge method (see `domerge methods`, which names the default and why)")
    p.add_argument("--weights", default=None, help="strengths w1,w2,... (default 1 each)")
    p.add_argument("--base", default=None, metavar="MODEL.safetensors",
                   help="the base model (SD/SDXL checkpoint or diffusers component file): DoRA, "
                        "OFT, BOFT and GLoRA inputs need it")
    p.add_argument("--clip-weights", default=None,
                   help="text-encoder strengths c1,c2,... (default: the --weights); like LoraLoader's strength_clip")
    p.add_argument("--block-weights", action="append", default=None, metavar="VECTOR",
                   help="per-block weights: a preset (SD-OUTALL, SDXL-INALL, FLUX-DOUBLE, ...) or numbers "
                        "BASE,IN..,MID,OUT.. (SD1 17/26/27, SDXL 12/20/21, Flux 58/20 values; see README); "
                        "once for every input or once per input ('-' for none)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--rank", type=int, default=None, help="truncate the output to this rank (exact SVD)")
    r.add_argument("--energy", type=float, default=None,
                   help="truncate each module to keep this fraction of its singular energy (0..1]")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", choices=list(OUTPUT_CHOICES), default=None, help="output dtype (default: the inputs')")
    p.add_argument("--compute-dtype", choices=["fp32", "fp64"], default="fp32")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="output layout (default: the first input's)")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE)")
    p.add_argument("--report", default=None, metavar="FILE.json", help="write the diagnostics as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and the report) if they exist")
    p.add_argument("-q", "--quiet", action="store_true")
    if method_params:
        _add_method_params(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="run a merge on an embedded example and explain what it shows")
    p.add_argument("--out-dir", default=None, help="also write the example and merged files here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import DomergeError

    debug = os.environ.get("DOMERGE_DEBUG") == "1"
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        ap = build_parser(method_params="merge" in argv)
        args = ap.parse_args(argv)
        if getattr(args, "func", None) is cmd_merge:      # the core's rules, before any file is read
            import domerge_core as dc
            dc.check_run_options(args.rank, args.energy, args.seed)
        if getattr(args, "device", None) not in (None, "auto"):
            from .devices import resolve_device
            resolve_device(args.device)
        return int(args.func(args) or 0)
    except DomergeError as e:
        if debug:
            raise
        _err(str(e))
        return EXIT_USAGE
    except _Terminated:
        _err("terminated; nothing was written")
        return 143
    except KeyboardInterrupt:
        _err("interrupted; nothing was written")
        return 130
    except BrokenPipeError:  # `domerge methods | head`: the reader left, nothing to report
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:
        if debug:
            raise
        name = e.filename or ""
        _err(f"{name}: {e.strerror or e}" if name else str(e))
        return EXIT_USAGE
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    except Exception as e:  # a bug: still one line, with a hint
        if debug:
            raise
        _err(f"internal error: {type(e).__name__}: {e} (set DOMERGE_DEBUG=1 for a traceback)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
