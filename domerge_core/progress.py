"""Progress and cancellation: one callback shape for the CLI bar, ComfyUI's ProgressBar and widgets.

A callback is ``progress(done: int, total: int, stage: str) -> None``. It may raise
`MergeCancelled` (or any exception) to stop the merge; the core lets it propagate and writes
nothing. ``stage`` is a short word: "load", "orthogonalize", "merge", "truncate", "write".
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

ProgressFn = Callable[[int, int, str], None]

PARK_ENV = "DOMERGE_PARK_AT"
_parked = False


def report(progress: Optional[ProgressFn], done: int, total: int, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)
    checkpoint(stage)


def checkpoint(stage: str) -> None:
    """A named point of the run. Test hook: with ``DOMERGE_PARK_AT=<stage>`` in the environment
    the process stops at the first such point of that stage (progress stages, and "write" once the
    output's temp file holds data) and waits there until a signal handler raises (Ctrl-C, SIGTERM
    in the CLI), so interruption tests need not race the merge. Unset: a dictionary lookup."""
    global _parked
    if _parked or os.environ.get(PARK_ENV) != stage:
        return
    _parked = True
    while True:
        # short sleeps, not signal.pause(): a signal that lands just before pause() would be
        # handled and then leave pause() waiting for another; each wake-up runs pending handlers
        time.sleep(0.05)
