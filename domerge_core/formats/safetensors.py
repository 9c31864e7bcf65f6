"""Files: safe opening of safetensors (header only, errors that name the file), atomic writes, hashes.

Nothing here ever unpickles: ``.ckpt/.pt/.bin`` and pickle/zip payloads are refused by their first
bytes, before any parser sees them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ..errors import DomergeError, LoraFormatError, OutputExistsError
from ..progress import checkpoint

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
CONVERT_HINT = "convert it to .safetensors first (domerge never unpickles files)"
MAX_HEADER = 100 * 1024 * 1024          # safetensors' own limit
# No LoRA factor comes near these (Flux's widest layer is 21504; an LLM vocabulary ~2^18). A header
# that declares more is refused before anything is mapped or allocated: a sparse file can really be
# terabytes long and pass every size check.
MAX_DIM = 1 << 24
MAX_TENSOR_ELEMENTS = 1 << 31

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str                 # safetensors dtype name ("F16", "BF16", "F32", ...)
    shape: Tuple[int, ...]
    begin: int                 # byte offsets inside the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Header:
    path: str
    tensors: Dict[str, TensorInfo]       # in file order
    metadata: Dict[str, str]
    data_start: int                      # absolute offset of the data section
    size: int                            # file size


def _looks_like_pickle(head: bytes) -> Optional[str]:
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save checkpoint)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle"
    return None


def read_header(path: str) -> Header:
    """Parse a safetensors header without touching tensor data; every problem raises
    :class:`LoraFormatError` naming the file (missing, folder, empty, pickle, truncated, garbage)."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise LoraFormatError(f"{os.path.splitext(path)[1]} files are pickles and are never loaded; {CONVERT_HINT}",
                              file=path)
    if not os.path.exists(path):
        raise LoraFormatError("file not found", file=path)
    if os.path.isdir(path):
        raise LoraFormatError("is a folder, not a .safetensors file", file=path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise LoraFormatError("empty file (0 bytes), not a safetensors file", file=path)
            kind = _looks_like_pickle(head)
            if kind:
                raise LoraFormatError(f"is {kind}, not safetensors; {CONVERT_HINT}", file=path)
            if len(head) < 8:
                raise LoraFormatError(f"truncated: {size} bytes is too short for a safetensors header", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n < 2:
                raise LoraFormatError("not a safetensors file (invalid header length)", file=path)
            if 8 + n > size:
                raise LoraFormatError(f"truncated: header says {n} bytes but the file has {size - 8}", file=path)
            raw = f.read(n)
    except OSError as e:
        raise LoraFormatError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFormatError("not a safetensors file (header is not JSON)", file=path) from None
    if not isinstance(obj, dict):
        raise LoraFormatError("not a safetensors file (header is not a JSON object)", file=path)
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LoraFormatError("invalid safetensors metadata", file=path)
    data_start = 8 + n
    data_len = size - data_start
    tensors: Dict[str, TensorInfo] = {}
    for name, info in obj.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoraFormatError("invalid safetensors header entry", file=path, key=name) from None
        t = TensorInfo(dtype, shape, begin, end)
        if any(d < 0 for d in shape):
            raise LoraFormatError(f"invalid safetensors header: negative dimension in shape {list(shape)}",
                                  file=path, key=name)
        if any(d > MAX_DIM for d in shape) or t.numel > MAX_TENSOR_ELEMENTS:
            gib = t.numel * DTYPE_SIZES.get(dtype, 1) / 2 ** 30
            raise LoraFormatError(f"declares a tensor of shape {list(shape)} ({gib:,.0f} GiB); no LoRA factor is "
                                  f"that large, so the file is refused before reading it", file=path, key=name)
        if dtype in DTYPE_SIZES and end - begin != t.numel * DTYPE_SIZES[dtype]:
            raise LoraFormatError("invalid safetensors header: tensor size does not match its shape",
                                  file=path, key=name)
        if end > data_len or begin > end:
            raise LoraFormatError(f"truncated: tensor data ends at byte {data_start + end} but the file has "
                                  f"{size} bytes", file=path, key=name)
        tensors[name] = t
    return Header(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in meta.items()},
                  data_start=data_start, size=size)


class LazyFile:
    """One open ``safetensors.safe_open`` handle per file, opened on first use (memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        self._handle = None

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open
            try:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            except FileNotFoundError:
                raise LoraFormatError("file not found (was it moved after loading?)", file=self.path) from None
            except Exception as e:  # safetensors raises SafetensorError / OSError
                raise LoraFormatError(f"cannot read safetensors data: {e}", file=self.path) from None
        return self._handle

    def get(self, key: str):
        try:
            return self._open().get_tensor(key)
        except DomergeError:
            raise
        except Exception as e:
            raise LoraFormatError(f"cannot read tensor: {e}", file=self.path, key=key) from None

    def close(self) -> None:
        self._handle = None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def sha256_cached(path: str) -> str:
    """sha256 keyed by (path, size, mtime) — inputs are hashed once per process."""
    st = os.stat(path)
    k = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if k not in _SHA_CACHE:
        _SHA_CACHE[k] = sha256_file(path)
    return _SHA_CACHE[k]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(path: str, *, overwrite: bool = False, inputs: Iterable[str] = ()) -> str:
    """Refuse an output that is one of the inputs (always) or exists (unless ``overwrite``)."""
    path = os.fspath(path)
    for src in inputs:
        if src and os.path.exists(src) and os.path.exists(path) and _same_file(src, path):
            raise OutputExistsError("output path is one of the input files; choose another name", file=path)
        if src and os.path.abspath(src) == os.path.abspath(path):
            raise OutputExistsError("output path is one of the input files; choose another name", file=path)
    if os.path.isdir(path):
        raise OutputExistsError("output path is a folder", file=path)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError("output file exists; pass --overwrite (overwrite=True) to replace it", file=path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DomergeError(f"output folder does not exist: {parent}", file=path)
    return path


def _listdir(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def atomic_write(path: str, write: Callable, *, overwrite: bool = False, inputs: Iterable[str] = (),
                 pass_path: bool = False) -> str:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object (``pass_path=True``:
    ``write(tmp_path)`` writes the temp file by name) in the target folder; it is fsynced, then
    ``os.replace``d onto ``path``. The temp file is removed on any failure (KeyboardInterrupt and
    SIGTERM-as-KeyboardInterrupt included, even one landing right after the file is created: it is
    then found by its per-call prefix), so a failed or cancelled write leaves neither output nor litter.
    Write errors (read-only folder, disk full) become :class:`DomergeError` naming ``path``."""
    path = check_output_path(path, overwrite=overwrite, inputs=list(inputs))
    folder = os.path.dirname(os.path.abspath(path))
    tmp = ""
    fd = -1
    # a prefix unique to this call: if an interrupt lands between mkstemp creating the file and
    # returning its name, the cleanup still finds it by the prefix
    prefix = f".{os.path.basename(path)}.{secrets.token_hex(4)}."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        if pass_path:
            os.close(fd)
            fd = -1
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            f = os.fdopen(fd, "wb")
            fd = -1
            with f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        if not overwrite and os.path.exists(path):   # appeared meanwhile: still never replace it
            raise OutputExistsError("output file exists; pass --overwrite (overwrite=True) to replace it",
                                    file=path)
        os.replace(tmp, path)
        tmp = ""
    except BaseException as e:
        if fd != -1:
            with contextlib.suppress(OSError):
                os.close(fd)
        leftovers = [tmp] if tmp else [os.path.join(folder, n) for n in _listdir(folder) if n.startswith(prefix)]
        for t in leftovers:
            with contextlib.suppress(OSError):
                os.remove(t)
        if isinstance(e, DomergeError) or not isinstance(e, Exception):
            raise
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":   # disk full, quota, read-only...
            reason = getattr(e, "strerror", None) or str(e)
            raise DomergeError(f"cannot write the output: {reason}; nothing was written", file=path) from e
        raise
    with contextlib.suppress(OSError):      # make the rename durable too (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(f, tensors, metadata: Optional[Dict[str, str]] = None) -> None:
    """Serialise to an open binary file, one tensor at a time (no second copy of the whole file in
    memory). Keys and metadata are sorted, so the same tensors and metadata give the same bytes:
    ``safetensors.save_file`` orders metadata by a hash map, which differs from run to run."""
    import json
    import sys

    names = sorted(tensors)
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in names:
        t = tensors[name]
        dt = _ST_DTYPES.get(str(t.dtype).replace("torch.", ""))   # tensors or LazyTensors
        if dt is None:
            raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)          # data starts 8-byte aligned, as safetensors writes it
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    f.flush()
    checkpoint("write")
    for name in names:
        t = tensors[name]
        if hasattr(t, "materialize"):            # formats.writers.LazyTensor: computed only now
            t = t.materialize()
            if tuple(t.shape) != tuple(header[name]["shape"]):
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, planned {header[name]['shape']}")
        t = t.detach().to("cpu").contiguous().reshape(-1)
        data = t.view(__import__("torch").uint8).numpy()
        if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
            data = t.numpy().byteswap().view("uint8")
        f.write(memoryview(data))


def save_safetensors(tensors, path: str, metadata: Optional[Dict[str, str]] = None, *,
                     overwrite: bool = False, inputs: Iterable[str] = ()) -> str:
    """Atomic, deterministic safetensors write (see `write_safetensors`)."""
    return atomic_write(path, lambda f: write_safetensors(f, tensors, metadata),
                        overwrite=overwrite, inputs=inputs)


_SCALAR_FORMATS = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
                   "U8": "<B", "U16": "<H", "U32": "<I", "U64": "<Q"}


def read_scalar(header: Header, key: str) -> float:
    """The value of a one-element tensor (an alpha), read straight from the file — no torch needed."""
    t = header.tensors[key]
    with open(header.path, "rb") as f:
        f.seek(header.data_start + t.begin)
        raw = f.read(t.end - t.begin)
    if t.dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw[:2])[0]
    fmt = _SCALAR_FORMATS.get(t.dtype)
    if fmt is None or len(raw) != struct.calcsize(fmt):
        raise LoraFormatError(f"cannot read a {t.dtype} scalar", file=header.path, key=key)
    return float(struct.unpack(fmt, raw)[0])
