"""Progress and cancellation: one callback shape for the CLI bar, ComfyUI's ProgressBar and widgets.

A callback is ``progress(done: int, total: int, stage: str) -> None``. It may raise
`MergeCancelled` (or any exception) to stop the merge; the core lets it propagate and writes
nothing. ``stage`` is a short word: "load", "orthogonalize", "merge", "truncate", "write".
"""
from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, int, str], None]


def report(progress: Optional[ProgressFn], done: int, total: int, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)
