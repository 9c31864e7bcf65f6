"""Stub of ``torchaudio.functional`` (see the package docstring)."""
from ._stub import getattr_for

__getattr__ = getattr_for("torchaudio.functional")
