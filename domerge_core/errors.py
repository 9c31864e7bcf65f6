"""Exception types of the core. Every adapter (CLI, nodes, widgets) catches `DomergeError`.

The CLI prints ``error: <file>: <reason>`` (one line, exit 2); nodes raise it as a node error;
widgets show it in the panel. Each error carries the file and, where known, the tensor key.
"""
from __future__ import annotations


class DomergeError(Exception):
    """Base of every error the core raises on purpose."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.key = key

    def __str__(self) -> str:  # one line, ready for "error: <file>: <reason>"
        msg = self.message
        if self.key and self.key not in msg:
            msg = f"{msg} (key {self.key!r})"
        return f"{self.file}: {msg}" if self.file else msg


class LoraFormatError(DomergeError):
    """The file is unreadable, not safetensors, broken, or of a LoRA format we cannot merge."""


class UnsupportedFormatError(LoraFormatError):
    """A known adapter type that is not a plain LoRA (LoHa, LoKr, OFT, DoRA, full diff...)."""


class IncompatibleLorasError(DomergeError):
    """Inputs that cannot be merged together (different base models, shape conflicts)."""


class OutputExistsError(DomergeError):
    """The output file exists and overwrite was not requested."""


class MergeCancelled(DomergeError):
    """Raised through the progress callback when the user cancels (Ctrl-C, UI Cancel)."""


class NumericalError(DomergeError):
    """A linear-algebra step of the merge failed (a torch ``LinAlgError``: non-convergent SVD /
    eigendecomposition) or met values it cannot represent (non-finite factors, or factors whose
    update norm overflows the compute dtype). Names the input file(s) and the module key."""


class InvalidParameterError(DomergeError):
    """A method parameter is out of range or unknown."""
