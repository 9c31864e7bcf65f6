"""Trailing-edge debounce for live sliders.

A slider sends many value changes while it is dragged; only the last one should start a merge.
`Debouncer.trigger()` (re)arms a timer; when no new trigger arrives for ``wait`` seconds the
function runs once, on the timer's thread. ``flush()`` runs a pending call at once on the
caller's thread, which is what tests (and a notebook cell that wants the result now) use, so the
logic can be checked without sleeping.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional


class Debouncer:
    def __init__(self, fn: Callable[[], None], wait: float = 0.35):
        self.fn = fn
        self.wait = float(wait)
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        self._generation = 0          # bumps on every trigger; a timer only fires its own generation
        self.calls = 0                # how many times fn actually ran (diagnostics, tests)

    @property
    def pending(self) -> bool:
        with self._lock:
            return self._timer is not None

    def trigger(self) -> None:
        """Ask for a call ``wait`` seconds from now, replacing any call still waiting."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._generation += 1
            gen = self._generation
            t = threading.Timer(self.wait, self._fire, args=(gen,))
            t.daemon = True
            self._timer = t
        t.start()

    def _fire(self, gen: int) -> None:
        with self._lock:
            if gen != self._generation or self._timer is None:
                return  # superseded by a later trigger, flushed, or cancelled
            self._timer = None
        self._run()

    def flush(self) -> bool:
        """Run the pending call now (on this thread). Returns whether there was one."""
        with self._lock:
            t, self._timer = self._timer, None
            self._generation += 1
        if t is None:
            return False
        t.cancel()
        self._run()
        return True

    def cancel(self) -> None:
        """Drop the pending call, if any."""
        with self._lock:
            t, self._timer = self._timer, None
            self._generation += 1
        if t is not None:
            t.cancel()

    def _run(self) -> None:
        self.calls += 1
        self.fn()
