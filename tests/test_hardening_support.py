"""Shared helpers of the hardening suite (issue 6); holds no tests itself.

- Byte-level builders for real safetensors files: valid kohya LoRAs (written with the real
  ``safetensors`` library) and hand-made headers that lie (offsets, dtypes, shapes, duplicates).
- The catalogue of bad inputs (:data:`BAD_INPUTS`): each builds real files in a folder; the API,
  CLI, node and widget tests all feed the same catalogue to their interface.
- A fork server for the CLI: one process imports torch and ``domerge_core`` once, then every CLI
  run is a ``fork()`` of it that executes ``domerge_core/__main__.py`` exactly as
  ``python -m domerge_core`` would (own pid, own exit code, own stdout/stderr files, signals,
  rlimits, uid). Importing torch costs ~5 s on the shared CI box; a fork costs milliseconds, so
  the whole catalogue goes through a real process each. A few runs also go through a genuinely
  fresh ``python -m domerge_core`` to show the two agree.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# --------------------------------------------------------------------------------------------
# valid fixtures: small kohya LoRAs with real SD1.5 / SDXL module names and shapes
# --------------------------------------------------------------------------------------------
SD15 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1, 1),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
}
# SDXL kohya files use SGM names: input_blocks.4.1 == down_blocks.1.attentions.0 (attn2.to_k is
# 640x2048 in SDXL but 640x768 in SD1.5: the conflict the alignment check must find).
SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
}
META = {"sd15": {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"},
        "sdxl": {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}}
# the module the factor-level corruptions hit (its name must appear in the error)
VICTIM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
VICTIM_TOKENS = ("attn1_to_k", "attn1.to_k")


def kohya_tensors(modules: Dict[str, Tuple[int, ...]], rank: int = 4, alpha: Optional[float] = None,
                  seed: int = 0, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for name, shape in modules.items():
        k = tuple(shape[2:])
        fan_in = shape[1] * (math.prod(k) if k else 1)
        down = torch.randn(rank, shape[1], *k, generator=g) / fan_in ** 0.5
        up = torch.randn(shape[0], rank, *((1, 1) if k else ()), generator=g) * 0.05
        sd[name + ".lora_down.weight"] = down.to(dtype)
        sd[name + ".lora_up.weight"] = up.to(dtype)
        sd[name + ".alpha"] = torch.tensor(float(rank if alpha is None else alpha)).to(dtype)
    return sd


def save(sd: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def write_good(path: str, seed: int = 0, base: str = "sd15", **kw) -> str:
    return save(kohya_tensors(SD15 if base == "sd15" else SDXL, seed=seed, **kw), path, META[base])


# --------------------------------------------------------------------------------------------
# raw safetensors bytes
# --------------------------------------------------------------------------------------------
def split_file(blob: bytes) -> Tuple[int, dict, bytes]:
    """(header length n, parsed header, data section) of a safetensors file."""
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8:8 + n]), blob[8 + n:]


def raw_file(header: object, data: bytes, header_text: Optional[str] = None) -> bytes:
    text = header_text if header_text is not None else json.dumps(header, separators=(",", ":"))
    h = text.encode("utf-8")
    return struct.pack("<Q", len(h)) + h + data


def regions(blob: bytes) -> Dict[str, Tuple[int, int]]:
    """Byte ranges [lo, hi) of the three regions of a safetensors file."""
    n = struct.unpack("<Q", blob[:8])[0]
    return {"length": (0, 8), "header": (8, 8 + n), "data": (8 + n, len(blob))}


def with_header_edit(blob: bytes, edit: Callable[[dict], None]) -> bytes:
    _, header, data = split_file(blob)
    edit(header)
    return raw_file(header, data)


# --------------------------------------------------------------------------------------------
# the catalogue of bad inputs
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A bad input. ``build(folder)`` writes real files and returns the merge inputs.

    ``culprit``: the file name the error must mention; ``mention``: other words one of which
    must appear too (a module name); ``error``: the core exception class name expected (or any
    DomergeError when None); ``pickle_marker``: a path that must not exist afterwards (a pickle
    payload creates it when unpickled)."""
    name: str
    build: Callable[[str], List[str]]
    culprit: Optional[str] = "bad.safetensors"
    mention: Tuple[str, ...] = ()
    error: Optional[str] = None
    pickle_marker: Optional[str] = None
    tags: Tuple[str, ...] = ()


def _good(folder: str) -> str:
    return write_good(os.path.join(folder, "good.safetensors"), seed=1)


def _bytes_case(name: str, make: Callable[[bytes], bytes], **kw) -> Case:
    """The good file's bytes transformed by ``make``, saved as bad.safetensors, merged after a good one."""
    def build(folder: str) -> List[str]:
        g = _good(folder)
        src = write_good(os.path.join(folder, "src.safetensors"), seed=2)
        with open(src, "rb") as f:
            blob = f.read()
        os.remove(src)
        bad = os.path.join(folder, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(make(blob))
        return [g, bad]
    return Case(name, build, **kw)


def _tensor_case(name: str, edit: Callable[[Dict[str, torch.Tensor]], None], mention=VICTIM_TOKENS,
                 **kw) -> Case:
    """A well-formed safetensors file whose tensors are wrong for a LoRA (``edit`` changes them)."""
    def build(folder: str) -> List[str]:
        g = _good(folder)
        sd = kohya_tensors(SD15, seed=2)
        edit(sd)
        return [g, save(sd, os.path.join(folder, "bad.safetensors"), META["sd15"])]
    return Case(name, build, mention=mention, **kw)


class _Boom:
    """Pickle payload: unpickling it creates a folder (the proof that something unpickled)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _pickle_case(name: str, filename: str, zipped: bool) -> Case:
    marker = os.path.join(tempfile.gettempdir(), f"domerge-unpickled-{os.getpid()}-{name}")

    def build(folder: str) -> List[str]:
        g = _good(folder)
        payload = pickle.dumps({"state_dict": _Boom(marker)}, protocol=2)
        path = os.path.join(folder, filename)
        if zipped:   # torch.save's layout: a zip holding archive/data.pkl
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("archive/data.pkl", payload)
                z.writestr("archive/version", "3\n")
        else:
            with open(path, "wb") as f:
                f.write(payload)
        return [g, path]
    return Case(name, build, culprit=filename, pickle_marker=marker)


def _huge_header(blob: bytes) -> bytes:
    """A header declaring a 4 TiB fp16 down factor; the file itself stays small."""
    n, header, data = split_file(blob)
    key = VICTIM + ".lora_down.weight"
    cols = 1 << 39                        # 4 * 2^39 * 2 bytes = 4 TiB
    header[key]["shape"] = [4, cols]
    begin = header[key]["data_offsets"][0]
    header[key]["data_offsets"] = [begin, begin + 4 * cols * 2]
    return raw_file(header, data)


def _dup_keys(blob: bytes) -> bytes:
    """The same tensor name twice in the JSON header, with different entries."""
    n, header, data = split_file(blob)
    items = list(header.items())
    key = VICTIM + ".lora_down.weight"
    parts = [json.dumps(k) + ":" + json.dumps(v, separators=(",", ":")) for k, v in items]
    other = next(v for k, v in items if k.endswith("lora_down.weight") and k != key)
    parts.append(json.dumps(key) + ":" + json.dumps(other, separators=(",", ":")))
    return raw_file(None, data, header_text="{" + ",".join(parts) + "}")


def _edit_entry(key_suffix: str, fn: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def make(blob: bytes) -> bytes:
        def edit(h: dict) -> None:
            fn(h[VICTIM + key_suffix])
        return with_header_edit(blob, edit)
    return make


def _swap_offsets(blob: bytes) -> bytes:
    """Two tensors claiming the same bytes (overlap) — the other region is then never claimed."""
    def edit(h: dict) -> None:
        a = h[VICTIM + ".lora_down.weight"]
        b = h[VICTIM.replace("attn1_to_k", "attn1_to_q") + ".lora_down.weight"]
        a["data_offsets"] = list(b["data_offsets"])
    return with_header_edit(blob, edit)


def _set(d: Dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    d[VICTIM + key] = value


def _nan_down(sd):
    t = sd[VICTIM + ".lora_down.weight"].clone()
    t[1, 7] = float("nan")
    sd[VICTIM + ".lora_down.weight"] = t


def _inf_up(sd):
    t = sd[VICTIM + ".lora_up.weight"].clone()
    t[5, 0] = float("inf")
    sd[VICTIM + ".lora_up.weight"] = t


def _dup_module(sd):
    # lora_te_ (SD1.x) and lora_te1_ (SDXL) both name text_encoder: one module, two definitions
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        src = "lora_te_text_model_encoder_layers_0_self_attn_q_proj" + suffix
        sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj" + suffix] = sd[src].clone() * 2


def _mixed_layout(sd):
    # the victim once more in PEFT/diffusers spelling inside the kohya file
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    sd[base + ".lora_A.weight"] = sd[VICTIM + ".lora_down.weight"].clone()
    sd[base + ".lora_B.weight"] = sd[VICTIM + ".lora_up.weight"].clone()


def _drop(suffix: str):
    def edit(sd):
        del sd[VICTIM + suffix]
    return edit


def _oft(folder: str) -> List[str]:
    """An adapter type still refused without a base model (LoHa/LoKr are read since issue 15)."""
    g = _good(folder)
    sd = {}
    for name, (m, n, *k) in SD15.items():
        if k:
            continue
        sd[name + ".oft_blocks"] = torch.randn(4, m // 4, m // 4).half()
        sd[name + ".alpha"] = torch.tensor(4.0).half()
    return [g, save(sd, os.path.join(folder, "bad.safetensors"))]


def _full_checkpoint(folder: str) -> List[str]:
    g = _good(folder)
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3).half(),
          "model.diffusion_model.input_blocks.0.0.bias": torch.randn(320).half(),
          "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3).half()}
    return [g, save(sd, os.path.join(folder, "bad.safetensors"))]


def _no_tensors(folder: str) -> List[str]:
    g = _good(folder)
    p = os.path.join(folder, "bad.safetensors")
    with open(p, "wb") as f:
        f.write(raw_file({"__metadata__": {"ss_network_dim": "4"}}, b""))
    return [g, p]


def _sdxl_mix(folder: str) -> List[str]:
    a = write_good(os.path.join(folder, "good.safetensors"), seed=1, base="sd15")
    b = write_good(os.path.join(folder, "bad.safetensors"), seed=2, base="sdxl")
    return [a, b]


def _missing(folder: str) -> List[str]:
    return [_good(folder), os.path.join(folder, "bad.safetensors")]


def _folder(folder: str) -> List[str]:
    p = os.path.join(folder, "bad.safetensors")
    os.mkdir(p)
    return [_good(folder), p]


def _random_bytes(folder: str) -> List[str]:
    g = torch.Generator().manual_seed(7)
    data = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    p = os.path.join(folder, "bad.safetensors")
    with open(p, "wb") as f:
        f.write(data)
    return [_good(folder), p]


def _same_twice(folder: str) -> List[str]:
    g = _good(folder)
    return [g, g]


def _same_via_link(folder: str) -> List[str]:
    g = _good(folder)
    link = os.path.join(folder, "bad.safetensors")
    os.symlink(g, link)
    return [g, link]


def _alpha(value: float) -> Callable[[Dict[str, torch.Tensor]], None]:
    def edit(sd):
        sd[VICTIM + ".alpha"] = torch.tensor(value).half()
    return edit


def _factor_dtype(dtype: torch.dtype) -> Callable[[Dict[str, torch.Tensor]], None]:
    def edit(sd):
        k = VICTIM + ".lora_down.weight"
        sd[k] = (sd[k] * 100).to(dtype)
    return edit


def _rank(r: int) -> Callable[[Dict[str, torch.Tensor]], None]:
    def edit(sd):
        m, n = SD15[VICTIM]
        sd[VICTIM + ".lora_down.weight"] = (torch.randn(r, n) / n ** 0.5).half()
        sd[VICTIM + ".lora_up.weight"] = (torch.randn(m, r) * 0.05).half()
        sd[VICTIM + ".alpha"] = torch.tensor(float(r)).half()
    return edit


def _rank_mismatch(sd):
    sd[VICTIM + ".lora_up.weight"] = sd[VICTIM + ".lora_up.weight"][:, :3].contiguous()


def _one_dim(sd):
    sd[VICTIM + ".lora_down.weight"] = sd[VICTIM + ".lora_down.weight"].reshape(-1).contiguous()


def _wrong_width(sd):
    # down's width 321 matches no 320-wide layer; the up still 320 x 4
    sd[VICTIM + ".lora_down.weight"] = torch.randn(4, 321).half()


BAD_INPUTS: List[Case] = [
    # not a safetensors file at all
    Case("missing file", _missing),
    Case("a folder", _folder),
    _bytes_case("empty file", lambda b: b""),
    Case("random bytes", _random_bytes),
    _pickle_case("pickle .ckpt", "bad.ckpt", zipped=False),
    _pickle_case("pickle named .safetensors", "bad.safetensors", zipped=False),
    _pickle_case("torch zip named .safetensors", "bad.safetensors", zipped=True),
    # the 8-byte header length
    _bytes_case("only 5 bytes", lambda b: b[:5]),
    _bytes_case("header length 0", lambda b: struct.pack("<Q", 0) + b[8:]),
    _bytes_case("header length past the end", lambda b: struct.pack("<Q", len(b)) + b[8:]),
    _bytes_case("header length 2^63", lambda b: struct.pack("<Q", 1 << 63) + b[8:]),
    _bytes_case("header length points mid-JSON",
                lambda b: struct.pack("<Q", struct.unpack("<Q", b[:8])[0] // 2) + b[8:]),
    # the JSON header
    _bytes_case("header not JSON", lambda b: raw_file(None, split_file(b)[2], header_text="{not json" + " " * 40)),
    _bytes_case("header not UTF-8", lambda b: b[:8] + b"\xff\xfe" + b[10:]),
    _bytes_case("header is a JSON array", lambda b: raw_file([1, 2, 3], split_file(b)[2])),
    _bytes_case("entry without data_offsets", _edit_entry(".lora_down.weight", lambda e: e.pop("data_offsets"))),
    _bytes_case("offsets past the data", _edit_entry(".lora_down.weight",
                                                     lambda e: e.update(data_offsets=[e["data_offsets"][0], 10 ** 9]))),
    _bytes_case("offsets begin > end", _edit_entry(".lora_down.weight",
                                                   lambda e: e.update(data_offsets=e["data_offsets"][::-1]))),
    _bytes_case("two tensors on the same bytes", _swap_offsets),
    _bytes_case("dtype lies (F32 over F16 bytes)", _edit_entry(".lora_down.weight", lambda e: e.update(dtype="F32"))),
    _bytes_case("unknown dtype", _edit_entry(".lora_down.weight", lambda e: e.update(dtype="F99"))),
    _bytes_case("shape lies", _edit_entry(".lora_down.weight", lambda e: e.update(shape=[5, 320]))),
    _bytes_case("negative shape", _edit_entry(".lora_down.weight", lambda e: e.update(shape=[-4, -320]))),
    _bytes_case("duplicate JSON keys", _dup_keys),
    _bytes_case("header declares 4 TiB", _huge_header, tags=("huge",)),
    _bytes_case("metadata not a string map", lambda b: with_header_edit(
        b, lambda h: h.update(__metadata__={"ss_network_dim": {"x": [1, 2]}}))),
    _bytes_case("truncated inside the data", lambda b: b[:-100]),
    _bytes_case("extra bytes after the data", lambda b: b + b"\0" * 64),
    # well-formed safetensors, wrong as a LoRA
    Case("no tensors", _no_tensors),
    Case("keys of no known format (full checkpoint)", _full_checkpoint),
    Case("OFT (unsupported)", _oft),
    _tensor_case("up without down", _drop(".lora_down.weight")),
    _tensor_case("down without up", _drop(".lora_up.weight")),
    _tensor_case("up/down rank mismatch", _rank_mismatch),
    _tensor_case("1-D factor", _one_dim),
    _tensor_case("zero-rank factors", _rank(0)),
    _tensor_case("rank larger than the layer", _rank(400)),
    _tensor_case("alpha 0", _alpha(0.0)),
    _tensor_case("alpha negative", _alpha(-4.0)),
    _tensor_case("alpha NaN", _alpha(float("nan"))),
    _tensor_case("alpha Inf", _alpha(float("inf"))),
    _tensor_case("NaN in a down factor", _nan_down),
    _tensor_case("Inf in an up factor", _inf_up),
    _tensor_case("int32 factor", _factor_dtype(torch.int32)),
    _tensor_case("int64 factor", _factor_dtype(torch.int64)),
    _tensor_case("uint8 factor", _factor_dtype(torch.uint8)),
    _tensor_case("bool factor", _factor_dtype(torch.bool)),
    _tensor_case("same module twice (lora_te_ and lora_te1_)", _dup_module,
                 mention=("q_proj",)),
    _tensor_case("kohya and PEFT keys for one module", _mixed_layout),
    # several files
    Case("SD1.5 + SDXL", _sdxl_mix, mention=("good.safetensors",), error="IncompatibleLorasError"),
    Case("the same file twice", _same_twice, culprit="good.safetensors"),
    Case("the same file through a symlink", _same_via_link),
]

# The expectations for factor content: NaN/Inf cases must name the module.
for _c in BAD_INPUTS:
    if _c.name in ("NaN in a down factor", "Inf in an up factor"):
        _c.mention = VICTIM_TOKENS


def case_ids() -> List[str]:
    return [c.name for c in BAD_INPUTS]


def listing(*folders: str) -> Dict[str, List[str]]:
    return {f: sorted(os.listdir(f)) for f in folders}


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# API driver
# --------------------------------------------------------------------------------------------
def api_merge(paths: Sequence[str], out: str, method: str = "ta", overwrite: bool = False, **kw):
    """What an adapter does: load, check, merge, save (the public names only)."""
    import domerge_core as dc

    loras = [dc.load_lora(p) for p in paths]
    dc.check_compatible(loras)
    result = dc.merge(loras, method=method, device="cpu", **kw)
    return result.save(out, overwrite=overwrite)


def one_line(err: BaseException) -> str:
    s = str(err)
    assert "\n" not in s.strip(), f"error message is not one line: {s!r}"
    return s


# --------------------------------------------------------------------------------------------
# fork server for the CLI
# --------------------------------------------------------------------------------------------
SERVER = r'''
import importlib, json, os, resource, runpy, signal, sys, traceback
import torch
torch.set_num_threads(1)
import domerge_core
import domerge_core.cli
# warm up through the public names, the way the CLI reaches them ("merge" first: were a submodule
# named like it imported before, it could shadow the function; test_hardening_api checks that)
for name in ["merge"] + domerge_core.__all__:
    try:
        getattr(domerge_core, name)
    except Exception:
        pass
for m in ("formats.safetensors", "metadata", "formats.describe", "report.diagnostics", "engine.cache",
          "algebra.orthogonalize", "algebra.linalg"):
    try:
        importlib.import_module("domerge_core." + m)
    except Exception:
        pass
try:
    import safetensors.torch
except Exception:
    pass
proto = os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            # Ctrl-C as at a terminal, also when the test run itself was started in the background
            # (a non-interactive shell starts background jobs with SIGINT ignored; Python then
            # installs no KeyboardInterrupt handler, and SIGINT would do nothing)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            if req.get("tty"):   # stderr on a terminal: the CLI then draws its progress bar there
                err = os.open(req["tty"], os.O_RDWR | os.O_NOCTTY)
            else:
                err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(devnull, 0); os.dup2(out, 1); os.dup2(err, 2)
            proto.close()
            os.chdir(req["cwd"])
            os.environ.update(req.get("env") or {})
            if req.get("fsize") is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            if req.get("as_extra") is not None:
                vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
                lim = vm + req["as_extra"]
                resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
            if req.get("uid") is not None:
                os.setgroups([]); os.setgid(req["uid"]); os.setuid(req["uid"])
            if req.get("code") is not None:
                sys.argv = ["-c"]
                exec(compile(req["code"], "<hardening>", "exec"), {"__name__": "__main__"})
                code = 0
            else:
                sys.argv = [os.path.join(os.path.dirname(domerge_core.__file__), "__main__.py"), *req["argv"]]
                runpy.run_module("domerge_core", run_name="__main__", alter_sys=True)
                code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr); code = 1
        except BaseException:
            traceback.print_exc(); code = 1
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    proto.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
'''


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    pid: int = 0


class ForkServer:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("DOMERGE_DEBUG", None)
        self.proc = subprocess.Popen([PY, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=REPO, env=env, text=True, bufsize=1)
        self.io_dir = tempfile.mkdtemp(prefix="domerge-forkserver-")
        os.chmod(self.io_dir, 0o777)
        self.n = 0
        self.pending: Optional[int] = None

    def _line(self, timeout: float) -> dict:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (rc={self.proc.poll()})")
        return json.loads(line)

    def start(self, argv: Sequence[str] = (), cwd: str = REPO, *, code: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, fsize: Optional[int] = None, uid: Optional[int] = None,
              as_extra: Optional[int] = None, tty: Optional[str] = None) -> int:
        if self.pending is not None:     # an earlier test failed mid-run: finish that run first
            try:
                self.wait(120)
            except Exception:
                pass
        self.n += 1
        self.out = os.path.join(self.io_dir, f"{self.n}.out")
        self.err = os.path.join(self.io_dir, f"{self.n}.err")
        req = {"argv": list(map(str, argv)), "cwd": cwd, "code": code, "env": env or {}, "fsize": fsize,
               "uid": uid, "as_extra": as_extra, "stdout": self.out, "stderr": self.err, "tty": tty}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        self.pending = self._line(60)["pid"]
        return self.pending

    def wait(self, timeout: float = 120) -> Run:
        pid = self.pending
        try:
            rc = self._line(timeout)["rc"]
        except TimeoutError:
            os.kill(pid, 9)
            rc = self._line(30)["rc"]
            self.pending = None
            raise AssertionError(f"CLI run did not finish in {timeout} s; killed")
        self.pending = None
        err = file_bytes(self.err).decode(errors="replace") if os.path.exists(self.err) else ""
        return Run(rc, file_bytes(self.out).decode(errors="replace"), err, pid)

    def run(self, argv: Sequence[str] = (), cwd: str = REPO, timeout: float = 120, **kw) -> Run:
        self.start(argv, cwd, **kw)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        import shutil
        shutil.rmtree(self.io_dir, ignore_errors=True)


_server: Optional[ForkServer] = None


def server() -> ForkServer:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server


def run_fresh(argv: Sequence[str], cwd: str = REPO, timeout: float = 180, **popen) -> Run:
    """A genuinely fresh ``python -m domerge_core`` (slow: imports torch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DOMERGE_DEBUG", None)
    r = subprocess.run([PY, "-m", "domerge_core", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout, **popen)
    return Run(r.returncode, r.stdout, r.stderr)


def assert_one_error_line(run: Run, *names: str) -> str:
    """Exit 2, exactly one stderr line ``error: ...`` naming ``names`` (all), no traceback."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert run.rc == 2, f"exit code {run.rc}, stderr:\n{run.stderr}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{run.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for n in names:
        assert n in lines[0], f"{n!r} not named in {lines[0]!r}"
    return lines[0]


def nobody_uid() -> int:
    try:
        import pwd
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


# --------------------------------------------------------------------------------------------
# second pass (issue 14): the catalogue of bad files the first pass did not cover
# --------------------------------------------------------------------------------------------
RAW = "@@raw@@"


def _raw_entry(key_suffix: str, field: str, raw: str) -> Callable[[bytes], bytes]:
    """Set one header field of the victim tensor to raw JSON text (numbers JSON can spell but
    Python would not build: 5000 digits, 1e400, NaN...)."""
    def make(blob: bytes) -> bytes:
        _, header, data = split_file(blob)
        header[VICTIM + key_suffix][field] = RAW
        text = json.dumps(header, separators=(",", ":")).replace(json.dumps(RAW), raw)
        return raw_file(None, data, header_text=text)
    return make


def _raw_metadata(raw: str) -> Callable[[bytes], bytes]:
    def make(blob: bytes) -> bytes:
        _, header, data = split_file(blob)
        header["__metadata__"] = RAW
        text = json.dumps(header, separators=(",", ":")).replace(json.dumps(RAW), raw)
        return raw_file(None, data, header_text=text)
    return make


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _dup_field(blob: bytes) -> bytes:
    """One tensor entry with "dtype" twice (the second one lies)."""
    _, header, data = split_file(blob)
    key = VICTIM + ".lora_down.weight"
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps(header[key], separators=(",", ":"))
    return raw_file(None, data, header_text=text.replace(entry, entry[:-1] + ',"dtype":"F32"}'))


def _dup_metadata(blob: bytes) -> bytes:
    _, header, data = split_file(blob)
    text = json.dumps(header, separators=(",", ":"))
    return raw_file(None, data, header_text=text.replace('"__metadata__":{', '"__metadata__":{"ss_v2":"True","ss_v2":"False",'))


def _special_case(name: str, make_bad: Callable[[str], str], **kw) -> Case:
    """``make_bad(path)`` puts something that is not a regular file at ``path``."""
    def build(folder: str) -> List[str]:
        g = _good(folder)
        bad = os.path.join(folder, "bad.safetensors")
        make_bad(bad)
        return [g, bad]
    return Case(name, build, **kw)


def _header_limit_plus_one(blob: bytes) -> bytes:
    """Header length 100,000,001: over the safetensors limit (10^8), under 100 MiB (the old one)."""
    n = 100_000_001
    return struct.pack("<Q", n) + b"{" + b" " * (n - 2) + b"}"


PEFT_MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def write_peft(folder: str, config: Optional[dict] = None, seed: int = 0, metadata: Optional[dict] = None,
               name: str = "adapter_model.safetensors", modules: Sequence[str] = PEFT_MODULES) -> str:
    """A PEFT ``save_pretrained`` folder: adapter_model.safetensors (+ adapter_config.json)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        sd[f"base_model.model.{m}.lora_A.weight"] = (torch.randn(4, 64, generator=g) / 8).half()
        sd[f"base_model.model.{m}.lora_B.weight"] = (torch.randn(64, 4, generator=g) / 8).half()
    if config is not None:
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
    return save(sd, os.path.join(folder, name), {"format": "pt", **(metadata or {})})


def _peft_case(name: str, config=None, metadata: Optional[dict] = None, key: str = "", **kw) -> Case:
    """A good PEFT folder and a bad one (its adapter_config.json or lora_adapter_metadata is wrong)."""
    def build(folder: str) -> List[str]:
        g = write_peft(os.path.join(folder, "good"), {"r": 4, "lora_alpha": 8}, seed=1)
        bad = write_peft(os.path.join(folder, "bad"), None if callable(config) else config, seed=2,
                         metadata=metadata, name="bad.safetensors")
        if callable(config):
            config(os.path.join(folder, "bad", "adapter_config.json"))
        return [g, bad]
    culprit = "adapter_config.json" if config is not None else "bad.safetensors"
    return Case(name, build, culprit=kw.pop("culprit", culprit), mention=(key,) if key else (), **kw)


def _cfg(**fields) -> dict:
    return {"r": 4, "lora_alpha": 8, "peft_type": "LORA", **fields}


PASS2_INPUTS: List[Case] = [
    # the JSON header: numbers and nesting Python would choke on (category 4)
    _bytes_case("header nested 100000 deep", lambda b: raw_file(None, split_file(b)[2],
                header_text='{"x":' + _nested(100000) + "}")),
    _bytes_case("metadata nested 100000 deep", _raw_metadata('{"a":' + _nested(100000) + "}")),
    _bytes_case("5000-digit integer in a shape", _raw_entry(".lora_down.weight", "shape", "[4," + "9" * 5000 + "]"),
                mention=VICTIM_TOKENS),
    _bytes_case("5000-digit integer in data_offsets", _raw_entry(".lora_down.weight", "data_offsets",
                                                                 "[0," + "1" * 5000 + "]"), mention=VICTIM_TOKENS),
    _bytes_case("1e400 in a shape", _raw_entry(".lora_down.weight", "shape", "[4,1e400]"), mention=VICTIM_TOKENS),
    _bytes_case("1e400 in data_offsets", _raw_entry(".lora_down.weight", "data_offsets", "[0,1e400]"),
                mention=VICTIM_TOKENS),
    _bytes_case("NaN in a shape", _raw_entry(".lora_down.weight", "shape", "[4,NaN]"), mention=VICTIM_TOKENS),
    _bytes_case("float shape (4.0, 320.0)", _raw_entry(".lora_down.weight", "shape", "[4.0,320.0]"),
                mention=VICTIM_TOKENS),
    _bytes_case("float data_offsets", _edit_entry(".lora_down.weight", lambda e: e.update(
        data_offsets=[float(x) for x in e["data_offsets"]])), mention=VICTIM_TOKENS),
    _bytes_case("boolean in a shape", _edit_entry(".lora_down.weight", lambda e: e.update(shape=[True, 320])),
                mention=VICTIM_TOKENS),
    _bytes_case("negative data_offsets", _edit_entry(".lora_down.weight", lambda e: e.update(data_offsets=[-8, 0])),
                mention=VICTIM_TOKENS),
    _bytes_case("three data_offsets", _edit_entry(".lora_down.weight", lambda e: e.update(
        data_offsets=e["data_offsets"] + [0])), mention=VICTIM_TOKENS),
    _bytes_case("shape is a string", _edit_entry(".lora_down.weight", lambda e: e.update(shape="4x320")),
                mention=VICTIM_TOKENS),
    _bytes_case("shape is an object", _edit_entry(".lora_down.weight", lambda e: e.update(shape={"0": 4})),
                mention=VICTIM_TOKENS),
    _bytes_case("dtype is a list", _edit_entry(".lora_down.weight", lambda e: e.update(dtype=["F16"])),
                mention=VICTIM_TOKENS),
    _bytes_case("dtype is a number", _edit_entry(".lora_down.weight", lambda e: e.update(dtype=16)),
                mention=VICTIM_TOKENS),
    _bytes_case("dtype is null", _edit_entry(".lora_down.weight", lambda e: e.update(dtype=None)),
                mention=VICTIM_TOKENS),
    _bytes_case("entry is a string", lambda b: with_header_edit(
        b, lambda h: h.update({VICTIM + ".lora_down.weight": "F16"})), mention=VICTIM_TOKENS),
    _bytes_case("entry is a list", lambda b: with_header_edit(
        b, lambda h: h.update({VICTIM + ".lora_down.weight": [1, 2]})), mention=VICTIM_TOKENS),
    _bytes_case("metadata is a list", lambda b: with_header_edit(b, lambda h: h.update(__metadata__=["a"]))),
    _bytes_case("metadata value is a number", lambda b: with_header_edit(
        b, lambda h: h["__metadata__"].update(ss_network_dim=4)), mention=("ss_network_dim",)),
    _bytes_case("a field of an entry twice", _dup_field, mention=("dtype",)),
    _bytes_case("a metadata key twice", _dup_metadata, mention=("ss_v2",)),
    # one reader: what inspect and merge disagreed on (category 7)
    _tensor_case("alpha stored as bool", lambda sd: _set(sd, ".alpha", torch.tensor(True))),
    _tensor_case("alpha stored as fp8 e4m3", lambda sd: _set(sd, ".alpha", torch.tensor(4.0).to(torch.float8_e4m3fn))),
    _tensor_case("alpha stored as fp8 e5m2", lambda sd: _set(sd, ".alpha", torch.tensor(4.0).to(torch.float8_e5m2))),
    _bytes_case("header of 10^8 + 1 bytes", _header_limit_plus_one),
    # not a regular file (category 3: a FIFO blocked forever)
    _special_case("a FIFO", os.mkfifo),
    _special_case("a symlink to /dev/zero", lambda p: os.symlink("/dev/zero", p)),
    _special_case("a symlink to /dev/null", lambda p: os.symlink("/dev/null", p)),
    _special_case("a dangling symlink", lambda p: os.symlink(p + ".gone", p)),
    # PEFT configs of the wrong JSON types (category 4) and patterns from the file (category 3)
    _peft_case("adapter_config: lora_alpha is a string", _cfg(lora_alpha="8"), key="lora_alpha"),
    _peft_case("adapter_config: lora_alpha is a list", _cfg(lora_alpha=[8]), key="lora_alpha"),
    _peft_case("adapter_config: lora_alpha is 1e400", lambda p: open(p, "w").write(
        '{"r": 4, "lora_alpha": 1e400}'), key="lora_alpha"),
    _peft_case("adapter_config: lora_alpha is 5000 digits", lambda p: open(p, "w").write(
        '{"r": 4, "lora_alpha": ' + "7" * 5000 + "}")),
    _peft_case("adapter_config: r is a string", _cfg(r="4"), key="r"),
    _peft_case("adapter_config: use_rslora is the string 'false'", _cfg(use_rslora="false"), key="use_rslora"),
    _peft_case("adapter_config: alpha_pattern is a list", _cfg(alpha_pattern=["q_proj"]), key="alpha_pattern"),
    _peft_case("adapter_config: alpha_pattern value is a string", _cfg(alpha_pattern={"q_proj": "16"}),
               key="alpha_pattern"),
    _peft_case("adapter_config: rank_pattern value is a float", _cfg(rank_pattern={"q_proj": 2.5}),
               key="rank_pattern"),
    _peft_case("adapter_config: alpha_pattern with a group", _cfg(alpha_pattern={"(a*)*b": 16}),
               key="alpha_pattern"),
    _peft_case("adapter_config: alpha_pattern with a back-reference", _cfg(alpha_pattern={r"(q)\1": 16}),
               key="alpha_pattern"),
    _peft_case("adapter_config: nested 100000 deep", lambda p: open(p, "w").write(
        '{"r": 4, "x": ' + _nested(100000) + "}")),
    _peft_case("adapter_config: a FIFO", lambda p: os.mkfifo(p)),
    _peft_case("adapter_config: a dangling symlink", lambda p: os.symlink(p + ".gone", p)),
    _peft_case("adapter_config: use_dora is a string", _cfg(use_dora="yes"), key="use_dora"),
    _peft_case("lora_adapter_metadata: alpha_pattern with a group",
               metadata={"lora_adapter_metadata": json.dumps(_cfg(alpha_pattern={"(x+x+)+y": 16}))},
               key="alpha_pattern"),
    _peft_case("lora_adapter_metadata: lora_alpha is a string",
               metadata={"lora_adapter_metadata": json.dumps(_cfg(lora_alpha="a lot"))}, key="lora_alpha"),
    _peft_case("lora_adapter_metadata: nested 100000 deep",
               metadata={"lora_adapter_metadata": '{"r": 4, "x": ' + _nested(100000) + "}"}),
]


def pass2_ids() -> List[str]:
    return [c.name for c in PASS2_INPUTS]
