"""Files: safe opening of safetensors (header only, errors that name the file), atomic writes, hashes.

Nothing here ever unpickles: ``.ckpt/.pt/.bin`` and pickle/zip payloads are refused by their first
bytes, before any parser sees them. One reader for every command: ``inspect`` and ``merge`` both go
through :func:`read_header` (the same rules as the ``safetensors`` library, and some more), and
tensor data is read with plain reads (never memory-mapped: a file truncated or rewritten while it
is read is an error naming it, not a SIGBUS).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import DomergeError, LoraFormatError, OutputExistsError
from ..progress import checkpoint
from . import dtypes

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
CONVERT_HINT = "convert it to .safetensors first (domerge never unpickles files)"
MAX_HEADER = 100_000_000                # the safetensors library's own limit (decimal, not MiB)
# No LoRA factor comes near these (Flux's widest layer is 21504; an LLM vocabulary ~2^18). A header
# that declares more is refused before anything is mapped or allocated: a sparse file can really be
# terabytes long and pass every size check.
MAX_DIM = 1 << 24
MAX_TENSOR_ELEMENTS = 1 << 31
# The largest real LoRAs have a few thousand tensors (SDXL with convs: ~3.3k; a 405B LLM on every
# linear: ~2.6k). Per-tensor work is what makes a file of a million 1-element tensors slow, so the
# count is bounded, and the JSON parse stops as soon as it is exceeded.
ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
MAX_TENSORS = 65536
MAX_INT_DIGITS = 20                     # a JSON integer in a header never needs more (2^64 has 20)
SPARSE_MIN_SIZE = 16 << 20              # files at least this large must really hold their bytes...
SPARSE_RATIO = 8                        # ...at least 1/8 of them (holes are not LoRA data)

DTYPE_SIZES = dtypes.SIZES


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
    fingerprint: Tuple[int, ...] = field(default=(), compare=False)   # identity + version of the bytes read


def _fingerprint(st: os.stat_result) -> Tuple[int, ...]:
    """What changes when a file is replaced, truncated or rewritten (ctime cannot be set back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str, what: str = "file") -> Tuple[int, os.stat_result]:
    """Open ``path`` for reading without ever blocking (a FIFO is opened non-blocking, then refused):
    (fd, fstat). Anything but a regular file raises :class:`LoraFormatError` naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise LoraFormatError(f"{what} not found", file=path) from None
    except IsADirectoryError:
        raise LoraFormatError("is a folder, not a .safetensors file", file=path) from None
    except OSError as e:
        raise LoraFormatError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoraFormatError(f"is {_kind(st.st_mode)}, not a regular {what}; refused", file=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _pread(fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        chunks, got = [], 0
        while got < n:
            b = os.pread(fd, min(n - got, 1 << 26), offset + got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)
    os.lseek(fd, offset, os.SEEK_SET)       # pragma: no cover - Windows
    return os.read(fd, n)


def _pread_into(fd: int, buf: bytearray, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns the bytes read (fewer only at the end of the file)."""
    mv = memoryview(buf)
    got = 0
    preadv = getattr(os, "preadv", None)
    while got < len(buf):
        if preadv is not None:
            k = preadv(fd, [mv[got:got + (1 << 30)]], offset + got)
        else:   # pragma: no cover - no preadv
            b = _pread(fd, min(len(buf) - got, 1 << 26), offset + got)
            mv[got:got + len(b)] = b
            k = len(b)
        if k == 0:
            break
        got += k
    return got


def _looks_like_pickle(head: bytes) -> Optional[str]:
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save checkpoint)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle"
    return None


class _HeaderRefused(Exception):
    """Raised from the JSON hooks: stops parsing at once (message, key)."""


def _parse_int(s: str):
    # a 5000-digit integer becomes infinity: every field check then refuses it and names its key
    # (Python's int() would raise, or build a number no field can hold)
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        return float("-inf") if s.startswith("-") else float("inf")
    return int(s)


def safe_json_loads(text, *, max_objects: Optional[int] = None, what: str = "JSON",
                    too_many: Optional[str] = None):
    """``json.loads`` that cannot be made to recurse without bound, build huge integers, or keep
    duplicate keys silently; ``max_objects`` bounds the number of JSON objects built. Raises
    ``ValueError`` with a one-line reason (callers add the file name)."""
    count = [0]

    def pairs(items):
        count[0] += 1
        if max_objects is not None and count[0] > max_objects:
            raise _HeaderRefused(too_many or f"has more than {max_objects:,} JSON objects", None)
        d = {}
        for k, v in items:
            if k in d:
                raise _HeaderRefused("has the same key twice", k)
            d[k] = v
        return d

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_int=_parse_int)
    except _HeaderRefused as e:
        msg, key = e.args
        raise ValueError(f"{what} {msg}" + (f" ({_printable(key)!r})" if key is not None else "")) from None
    except RecursionError:
        raise ValueError(f"{what} nests too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{what} is not valid JSON") from None
    except ValueError as e:     # e.g. int conversion limits
        raise ValueError(f"{what} is not valid JSON ({str(e)[:80]})") from None


def _printable(s) -> str:
    from ..errors import escape_controls
    return escape_controls(str(s))


def _int_list(v, n: Optional[int] = None) -> Optional[Tuple[int, ...]]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        return None
    if not all(type(x) is int for x in v):
        return None
    return tuple(v)


def read_header(path: str) -> Header:
    """Parse a safetensors header without touching tensor data; every problem raises
    :class:`LoraFormatError` naming the file (missing, folder, FIFO/device, empty, pickle,
    truncated, garbage, sparse, too many tensors, wrong JSON types)."""
    path = os.fspath(path)
    fd, st = _open_file(path)
    try:
        return _read_header_fd(fd, st, path)
    finally:
        os.close(fd)


def open_header(path: str) -> Tuple[Header, int]:
    """(header, open descriptor of the same file): the caller reads from it and closes it."""
    path = os.fspath(path)
    fd, st = _open_file(path)
    try:
        return _read_header_fd(fd, st, path), fd
    except BaseException:
        os.close(fd)
        raise


def read_tensor_bytes(header: Header, fd: int, key: str) -> bytes:
    """One tensor's bytes through ``fd`` (from :func:`open_header`), checked unchanged."""
    t = header.tensors[key]
    raw = _pread(fd, t.end - t.begin, header.data_start + t.begin)
    if len(raw) != t.end - t.begin or _fingerprint(os.fstat(fd)) != header.fingerprint:
        raise LoraFormatError("changed while being read (replaced, truncated or rewritten)", file=header.path)
    return raw


def _open_file(path: str) -> Tuple[int, os.stat_result]:
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise LoraFormatError(f"{os.path.splitext(path)[1]} files are pickles and are never loaded; {CONVERT_HINT}",
                              file=path)
    return open_regular(path)


def _read_header_fd(fd: int, st: os.stat_result, path: str) -> Header:
    size = st.st_size
    try:
        head = _pread(fd, 8, 0)
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
        blocks = getattr(st, "st_blocks", None)
        if blocks is not None and size >= SPARSE_MIN_SIZE and blocks * 512 * SPARSE_RATIO < size:
            raise LoraFormatError(f"is a sparse file ({size:,} bytes long but only {blocks * 512:,} stored); "
                                  f"holes are not LoRA data, refused", file=path)
        raw = _pread(fd, n, 8)
        if len(raw) != n:
            raise LoraFormatError("changed while being read (shorter than its header says)", file=path)
    except OSError as e:
        raise LoraFormatError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LoraFormatError("not a safetensors file (header is not JSON)", file=path) from None
    try:
        # one object per tensor entry, plus the header itself and its __metadata__
        obj = safe_json_loads(text, max_objects=MAX_TENSORS + 2, what="header",
                              too_many=f"declares more than {MAX_TENSORS:,} tensors; no LoRA has that many")
    except ValueError as e:
        msg = str(e)
        if msg == "header is not valid JSON":
            msg = "not a safetensors file (header is not JSON)"
        raise LoraFormatError(msg, file=path) from None
    if not isinstance(obj, dict):
        raise LoraFormatError("not a safetensors file (header is not a JSON object)", file=path)
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise LoraFormatError("invalid safetensors metadata (not a JSON object)", file=path, key="__metadata__")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise LoraFormatError(f"invalid safetensors metadata: the value is a JSON {type(v).__name__}, "
                                  f"not a string", file=path, key=k)
    data_start = 8 + n
    data_len = size - data_start
    tensors: Dict[str, TensorInfo] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise LoraFormatError("invalid safetensors header entry (not a JSON object)", file=path, key=name)
        dtype = info.get("dtype")
        shape = _int_list(info.get("shape"))
        offsets = _int_list(info.get("data_offsets"), 2)
        if not isinstance(dtype, str) or shape is None or offsets is None:
            raise LoraFormatError("invalid safetensors header entry (dtype must be a string, shape and "
                                  "data_offsets lists of integers)", file=path, key=name)
        if dtype not in DTYPE_SIZES:
            raise LoraFormatError(f"unknown dtype {_printable(dtype)[:20]!r}", file=path, key=name)
        begin, end = offsets
        t = TensorInfo(dtype, shape, begin, end)
        if any(d < 0 for d in shape):
            raise LoraFormatError(f"invalid safetensors header: negative dimension in shape {list(shape)}",
                                  file=path, key=name)
        if any(d > MAX_DIM for d in shape) or t.numel > MAX_TENSOR_ELEMENTS:
            gib = t.numel * DTYPE_SIZES.get(dtype, 1) / 2 ** 30
            raise LoraFormatError(f"declares a tensor of shape {list(shape)} ({gib:,.0f} GiB); no LoRA factor is "
                                  f"that large, so the file is refused before reading it", file=path, key=name)
        if end > data_len or begin > end or begin < 0:
            raise LoraFormatError(f"truncated: tensor data ends at byte {data_start + end} but the file has "
                                  f"{size} bytes", file=path, key=name)
        if end - begin != t.numel * DTYPE_SIZES[dtype]:
            raise LoraFormatError("invalid safetensors header: tensor size does not match its shape",
                                  file=path, key=name)
        tensors[name] = t
    # the safetensors rule: tensors tile the data section exactly (no overlap, no gap, nothing after)
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            raise LoraFormatError("invalid safetensors header: tensor data overlaps another tensor or leaves "
                                  "a gap", file=path, key=name)
        pos = t.end
    if pos != data_len:
        raise LoraFormatError(f"invalid safetensors file: {data_len - pos} bytes after the last tensor", file=path)
    return Header(path=path, tensors=tensors, metadata=dict(meta), data_start=data_start, size=size,
                  fingerprint=_fingerprint(st))




class LazyFile:
    """One open file per input, opened on first use, read with plain reads (no mmap).

    On opening, the whole file is hashed (sha256, streamed) through the same descriptor; every later
    read checks that the file is still the one hashed (same inode, size, mtime and ctime). So the
    bytes merged are the bytes hashed, and a file replaced, truncated or rewritten meanwhile is an
    error naming it (:class:`LoraFormatError`), never a crash."""

    def __init__(self, path: str, header: Optional[Header] = None):
        self.path = path
        self.header = header
        self._fd = -1
        self._sha: Optional[str] = None
        self._lock = threading.Lock()

    def _changed(self) -> LoraFormatError:
        return LoraFormatError("changed while being read (replaced, truncated or rewritten); nothing was "
                               "merged from it — run again once it is complete", file=self.path)

    def _check(self) -> None:
        try:
            st = os.fstat(self._fd)
        except OSError:
            raise self._changed() from None
        if _fingerprint(st) != self.header.fingerprint:
            raise self._changed()

    def _open(self) -> None:
        if self._fd != -1:
            return
        try:
            fd, st = _open_file(self.path)
        except LoraFormatError as e:
            if "not found" in e.message:
                raise LoraFormatError("file not found (was it moved after loading?)", file=self.path) from None
            raise
        try:
            if self.header is None:
                self.header = _read_header_fd(fd, st, self.path)
            elif _fingerprint(st) != self.header.fingerprint:
                raise LoraFormatError("changed since it was loaded; load it again", file=self.path)
            h = hashlib.sha256()
            pos = 0
            while True:
                b = _pread(fd, 1 << 22, pos)
                if not b:
                    break
                h.update(b)
                pos += len(b)
            self._fd = fd
            if pos != st.st_size:
                raise self._changed()
            self._check()
            self._sha = h.hexdigest()
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    def sha256(self) -> str:
        """sha256 of the bytes this object reads tensors from."""
        with self._lock:
            self._open()
            return self._sha

    def _raw(self, key: str, t: TensorInfo) -> bytearray:
        n = t.end - t.begin
        with self._lock:
            self._open()
            buf = bytearray(n)
            try:
                got = _pread_into(self._fd, buf, self.header.data_start + t.begin)
            except OSError as e:
                raise LoraFormatError(f"cannot read tensor: {e.strerror or e}", file=self.path, key=key) from None
            if got != n:
                raise self._changed()
            self._check()
        return buf

    def info(self, key: str) -> TensorInfo:
        if self.header is None:
            with self._lock:
                self._open()
        t = self.header.tensors.get(key)
        if t is None:
            raise LoraFormatError("no such tensor", file=self.path, key=key)
        return t

    def raw(self, key: str) -> bytes:
        """The bytes of one tensor, as hashed (see the class)."""
        return bytes(self._raw(key, self.info(key)))

    def get(self, key: str):
        import torch
        t = self.info(key)
        dt = getattr(torch, dtypes.TORCH_NAMES[t.dtype], None)
        if dt is None:
            raise LoraFormatError(f"dtype {t.dtype} is not supported by this torch", file=self.path, key=key)
        buf = self._raw(key, t)
        if not buf:
            return torch.empty(t.shape, dtype=dt)
        return torch.frombuffer(buf, dtype=dt).reshape(t.shape)

    def close(self) -> None:
        with self._lock:
            if self._fd != -1:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1

    def __del__(self):
        with contextlib.suppress(Exception):
            if self._fd != -1:
                os.close(self._fd)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb") as f:
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


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
SIDECARS = ("adapter_config.json",)     # files read beside an input (formats.load_lora)


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def protected_paths(inputs: Iterable[str]) -> List[str]:
    """The inputs and every file read beside them (a PEFT folder's adapter files and
    ``adapter_config.json``): no output may be any of these."""
    out: List[str] = []
    for src in inputs:
        if not src or not isinstance(src, (str, os.PathLike)):
            continue
        src = os.fspath(src)
        if src.startswith("<"):
            continue
        out.append(src)
        folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        if os.path.isdir(src):
            out.extend(os.path.join(src, n) for n in ADAPTER_FILES)
        out.extend(os.path.join(folder, n) for n in SIDECARS)
    return out


def _existing_output(path: str) -> Optional[os.stat_result]:
    """lstat of an output path that exists (None if absent); refuses what must never be written over
    or through: folders, FIFOs, devices, sockets, dangling symbolic links."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DomergeError(f"cannot use the output path: {e.strerror or e}", file=path) from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError:
            raise OutputExistsError("output path is a symbolic link to a missing file; remove it or choose "
                                    "another name", file=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputExistsError("output path is a folder", file=path)
    if not stat.S_ISREG(st.st_mode):
        raise OutputExistsError(f"output path is {_kind(st.st_mode)}, not a regular file; refused", file=path)
    return st


def check_outputs(paths: Sequence[str], *, overwrite: bool = False, inputs: Iterable[str] = ()) -> List[str]:
    """Check every path a command will write, before anything is computed or written: none is an
    input or a file read beside one (always refused), two outputs are never the same file, none is a
    folder, FIFO, device, socket or dangling link, and none exists unless ``overwrite``."""
    paths = [os.fspath(p) for p in paths]
    inputs = [os.fspath(i) for i in inputs if isinstance(i, (str, os.PathLike))]
    protected = protected_paths(inputs)
    for i, path in enumerate(paths):
        if not path:
            raise DomergeError("empty output path")
        for src in protected:
            if _same_file(src, path):
                what = "one of the input files" if src in inputs else "a file read with the inputs"
                raise OutputExistsError(f"output path is {what} ({_printable(os.path.basename(src))}); "
                                        f"choose another name", file=path)
        for other in paths[:i]:
            if _same_file(other, path):
                raise OutputExistsError(f"two outputs name the same file ({_printable(other)}); choose "
                                        f"another name", file=path)
        st = _existing_output(path)
        if st is not None and not overwrite:
            raise OutputExistsError("output file exists; pass --overwrite (overwrite=True) to replace it",
                                    file=path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DomergeError(f"output folder does not exist: {parent}", file=path)
    return paths


def check_output_path(path: str, *, overwrite: bool = False, inputs: Iterable[str] = ()) -> str:
    """Refuse an output that is one of the inputs (always) or exists (unless ``overwrite``)."""
    return check_outputs([path], overwrite=overwrite, inputs=list(inputs))[0]


def _listdir(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


# Temp files: short names (any output name up to the 255-byte limit works) that say who made them,
# so a later write into the same folder removes those a killed process (kill -9, power loss) left:
# ".domerge-<host>-<pid>-<random>.tmp". Only this host's, only of processes that no longer exist.
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
TEMP_RE = re.compile(r"^\.domerge-([0-9a-f]{6})-(\d+)-[0-9a-f]{8}\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(folder: str) -> List[str]:
    """Remove the temp files of dead domerge processes of this host in ``folder``; returns them."""
    gone = []
    for n in _listdir(folder):
        m = TEMP_RE.match(n)
        if m and m.group(1) == _HOST and not _pid_alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, n))
                gone.append(n)
    return gone


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:   # pragma: no cover - no /proc
        m = os.umask(0o022)
        os.umask(m)
        return m


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished temp file to ``path``. Not overwriting: atomically, never replacing a file
    that appeared meanwhile (a hard link fails if the name exists; then RENAME_NOREPLACE)."""
    if overwrite:
        os.replace(tmp, path)
        return
    exists = OutputExistsError("output file exists (it appeared while this one was written); pass "
                               "--overwrite (overwrite=True) to replace it; nothing was written", file=path)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError as e:     # filesystems without hard links (FAT, some FUSE/SMB mounts)
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                           errno.EACCES, errno.EXDEV):
            raise
        if _rename_noreplace(tmp, path, exists):
            return
        if os.path.lexists(path):
            raise exists from None
        os.replace(tmp, path)       # neither is supported: the best left
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _rename_noreplace(tmp: str, path: str, exists: Exception) -> bool:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    r = fn(AT_FDCWD, os.fsencode(tmp), AT_FDCWD, os.fsencode(path), RENAME_NOREPLACE)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise exists
    return False


def atomic_write(path: str, write: Callable, *, overwrite: bool = False, inputs: Iterable[str] = (),
                 pass_path: bool = False) -> str:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object (``pass_path=True``:
    ``write(tmp_path)`` writes the temp file by name) in the target folder; it is fsynced, then
    published: without ``overwrite`` by an atomic no-replace step (a file that appeared meanwhile is
    never replaced), with it by ``os.replace``. The file gets the mode a plain ``open`` would give
    (0666 minus the umask), or keeps the mode of the file it replaces. The temp file is removed on
    any failure (KeyboardInterrupt and SIGTERM-as-KeyboardInterrupt included); after a ``kill -9``
    the next write into the same folder removes it. Write errors (read-only folder, disk full) become
    :class:`DomergeError` naming ``path``."""
    path = check_output_path(path, overwrite=overwrite, inputs=list(inputs))
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(folder)
    st = _existing_output(path)
    mode = (st.st_mode & 0o777) if st is not None and overwrite else (0o666 & ~_umask())
    tmp = ""
    fd = -1
    # a prefix unique to this call: if an interrupt lands between mkstemp creating the file and
    # returning its name, the cleanup still finds it by the prefix
    prefix = f".domerge-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(tmp, mode)
        if pass_path:
            os.close(fd)
            fd = -1
            write(tmp)
            with contextlib.suppress(OSError):
                os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            f = os.fdopen(fd, "wb")
            fd = -1
            with f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
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
        dt = dtypes.code_of(t.dtype)             # tensors or LazyTensors
        if dt is None or dt not in dtypes.FLOAT_CODES and name.endswith("weight"):
            from ..errors import InvalidParameterError
            raise InvalidParameterError(f"cannot write tensor {_printable(name)!r} of dtype {t.dtype}: LoRA "
                                        f"factors are written as fp16, bf16, fp32 or fp64")
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




def read_scalar(header: Header, key: str, raw: Optional[bytes] = None) -> float:
    """The value of a one-element tensor (an alpha), from the file's bytes (``raw``: already read,
    e.g. by :meth:`LazyFile.raw`). The one rule for ``inspect`` and ``merge``: float and integer
    dtypes are read; bool and fp8 alphas are refused (no trainer writes them; loaders disagree)."""
    t = header.tensors[key]
    if t.dtype not in dtypes.SCALAR_FORMATS and t.dtype != "BF16":
        raise LoraFormatError(f"alpha stored as {t.dtype}; expected a float or integer scalar",
                              file=header.path, key=key)
    if raw is None:
        fd, st = open_regular(header.path)
        try:
            if header.fingerprint and _fingerprint(st) != header.fingerprint:
                raise LoraFormatError("changed since it was loaded; load it again", file=header.path)
            raw = _pread(fd, t.end - t.begin, header.data_start + t.begin)
        finally:
            os.close(fd)
    if t.dtype == "BF16":
        if len(raw) != 2:
            raise LoraFormatError("cannot read a BF16 scalar", file=header.path, key=key)
        return struct.unpack("<f", b"\0\0" + raw[:2])[0]
    fmt = dtypes.SCALAR_FORMATS[t.dtype]
    if len(raw) != struct.calcsize(fmt):
        raise LoraFormatError(f"cannot read a {t.dtype} scalar", file=header.path, key=key)
    return float(struct.unpack(fmt, raw)[0])


def resolve_input(path: str) -> str:
    """The safetensors file a user's input names: the file itself, or the one LoRA file of a PEFT
    ``save_pretrained`` / diffusers ``save_lora_weights`` folder (`ADAPTER_FILES`). The one rule
    for ``merge`` and ``inspect``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ADAPTER_FILES if os.path.isfile(os.path.join(path, n))]
        if len(found) != 1:
            raise LoraFormatError("is a folder; give the .safetensors file itself" if not found else
                                  f"is a folder with several LoRA files ({', '.join(map(os.path.basename, found))}); "
                                  f"give one of them", file=path)
        return found[0]
    return path


def adapter_config_beside(path: str, tensor_names, metadata) -> Optional[str]:
    """``adapter_config.json`` next to a PEFT-style file (lora_A/lora_B, PEFT OFT/BOFT keys, no diffusers
    ``lora_adapter_metadata``), if there is one: it holds the file's alphas (OFT/BOFT: their settings)."""
    uses_ab = any(".lora_A" in k or ".lora_B" in k or ".oft_R" in k or ".boft_R" in k for k in tensor_names)
    if not uses_ab or "lora_adapter_metadata" in metadata:
        return None
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    return beside if os.path.lexists(beside) else None
