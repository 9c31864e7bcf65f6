"""MergeCache: per-module work that survives a strength or λ change (live sliders).

What is cached, per module and per *set of active inputs* (the LoRAs with a non-zero strength
that have the module): the prepared factors — format scale folded in, balanced form and
orthogonalized factors when ``orthogonalize`` is on — their diagnostics, and the decouple column
magnitudes. None of these depend on the strengths (method.md §1: strengths commute with the
descent) or on λ, the magnitude rule, the recombination or the truncation, so moving those sliders
re-runs only the cheap recombination. Changing the orthogonalization options, the device, the
compute dtype, or which inputs are active (a strength moving to or from 0) misses the cache.

Entries hold strong references to the input modules, so an ``id()`` in a key cannot be reused by
another object while the entry lives. ``max_entries`` bounds the size (oldest dropped first).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Hashable, Optional


class MergeCache:
    """Pass the same instance to successive ``merge(..., cache=cache)`` calls."""

    def __init__(self, max_entries: Optional[int] = None):
        self._entries: "OrderedDict[Hashable, Dict[str, Any]]" = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[Dict[str, Any]]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: Hashable, entry: Dict[str, Any]) -> None:
        self._entries[key] = entry
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> Dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
