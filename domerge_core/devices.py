"""Device selection: ``resolve_device("auto" | "cpu" | "cuda" | "cuda:1" | "mps")``.

The merge code is the same torch code on every device; this only turns the user's word into a
`torch.device` and gives a clear error when the requested accelerator is not there.
"""
from __future__ import annotations

import contextlib
import threading

from typing import Union

import torch

from .errors import InvalidParameterError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. An explicit device that is absent is an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidParameterError(f"device {device!r} requested but CUDA is not available")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidParameterError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if name == "mps":
        if not _mps_available():
            raise InvalidParameterError(f"device {device!r} requested but MPS is not available")
        return torch.device("mps")
    raise InvalidParameterError(f"unknown device {device!r} (use one of {', '.join(DEVICE_CHOICES)})")


def supports_float64(device: torch.device) -> bool:
    """MPS has no float64."""
    return device.type != "mps"


_THREADS_LOCK = threading.RLock()


@contextlib.contextmanager
def fixed_cpu_threads(device):
    """Run a block of CPU linear algebra on one intra-op thread: LAPACK's SVD/QR round differently
    with 1 and N threads (up to ~1e-4 on a merged factor), and the README promises the same bytes
    for the same inputs whatever the machine's thread count. No-op off the CPU."""
    if getattr(device, "type", str(device)) != "cpu":
        yield
        return
    import torch
    with _THREADS_LOCK:
        n = torch.get_num_threads()
        if n != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if n != 1:
                torch.set_num_threads(n)
