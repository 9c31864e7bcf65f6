"""Stub of ``torchaudio.transforms`` (see the package docstring)."""
from ._stub import getattr_for

__getattr__ = getattr_for("torchaudio.transforms")
