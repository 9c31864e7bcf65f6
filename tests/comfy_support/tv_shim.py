"""Let PyPI's torchvision import beside a CPU-only torch (test-only).

PyPI's x86_64 torchvision wheel links the CUDA builds of libtorch, so next to the CPU wheel its
compiled ops (``torchvision::nms`` ...) never load and ``import torchvision`` dies in
``_meta_registrations`` with ``RuntimeError: operator torchvision::nms does not exist``.
ComfyUI imports torchvision at module level but never calls those ops for SD-style models.

`install()` makes ``torch.library.register_fake`` / ``register_autograd`` skip registrations for
``torchvision::*`` operators that do not exist, so the pure-Python parts of torchvision import
and work. It changes nothing for operators that exist (a CPU torchvision, or a CUDA torch).
"""
from __future__ import annotations

import functools

_installed = False


def _missing_torchvision_op(name) -> bool:
    import torch

    if not isinstance(name, str) or not name.startswith("torchvision::"):
        return False
    op = name.split("::", 1)[1].split(".", 1)[0]
    try:
        getattr(torch.ops.torchvision, op)
    except (AttributeError, RuntimeError):
        return True
    return False


def install() -> None:
    """Idempotent; call before anything imports torchvision."""
    global _installed
    if _installed:
        return
    import torch.library

    real_fake = torch.library.register_fake
    real_autograd = torch.library.register_autograd

    @functools.wraps(real_fake)
    def register_fake(op, func=None, /, *args, **kwargs):
        if _missing_torchvision_op(op):
            return func if func is not None else (lambda f: f)
        return real_fake(op, func, *args, **kwargs)

    @functools.wraps(real_autograd)
    def register_autograd(op, *args, **kwargs):
        if _missing_torchvision_op(op):
            return None
        return real_autograd(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    torch.library.register_autograd = register_autograd
    _installed = True
