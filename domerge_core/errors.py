"""Exception types of the core. Every adapter (CLI, nodes, widgets) catches `DomergeError`.

The CLI prints ``error: <file>: <reason>`` (one line, exit 2); nodes raise it as a node error;
widgets show it in the panel. Each error carries the file and, where known, the tensor key.
"""
from __future__ import annotations

import re

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: a file or tensor name
# carrying them could forge a second "error:" line or drive the terminal (ANSI escapes).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``):
    what names from a file look like on a terminal or in a one-line error."""
    def sub(m):
        c = m.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return _CONTROLS.sub(sub, str(text))


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
        return escape_controls(f"{self.file}: {msg}" if self.file else msg)


class LoraFormatError(DomergeError):
    """The file is unreadable, not safetensors, broken, or of a LoRA format we cannot merge."""


class UnsupportedFormatError(LoraFormatError):
    """A known adapter type we cannot merge (BOFT, PEFT DoRA, bias diffs...; OFT/DoRA without a base)."""


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
