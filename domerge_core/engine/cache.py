"""MergeCache: per-module work that survives a strength or λ change (live sliders).

What is cached, per module and per *set of active inputs* (the LoRAs with a non-zero strength
that have the module): the prepared factors — format scale folded in, balanced form and
orthogonalized factors when ``orthogonalize`` is on — their diagnostics, and the decouple column
magnitudes. None of these depend on the strengths (method.md §1: strengths commute with the
descent) or on λ, the magnitude rule, the recombination or the truncation, so moving those sliders
re-runs only the cheap recombination. Changing the orthogonalization options, the device, the
compute dtype, or which inputs are active (a strength moving to or from 0) misses the cache.

Three stores:

- module entries (``get``/``put``; counted in ``hits``/``misses``): one per module, the unit of
  reuse across different batchings;
- stacked batches (``get_stacked``/``put_stacked``): the same tensors stacked for one batch of
  modules, keyed by the tuple of its module keys, so a warm re-merge of an unchanged batch does
  no ``torch.stack`` copy at all. A module belongs to at most one stacked batch: storing a batch
  drops any other batch that shares a module with it, and evicting a module entry drops its
  batch, so the stacked store never holds more than one copy of a module's tensors;
- input norms (``get_norm``/``put_norm``): ``‖ΔW‖`` of a module of an input at strength 0 (for
  the per-LoRA diagnostics).

Values are `engine.prepare.Prepared` records (never modified once stored). Keys name the input
modules by their ``uid`` (unique per object, never reused), so no entry can be mistaken for another
object's. ``max_entries`` bounds the number of module entries (oldest dropped first), and likewise
the number of modules held in stacked batches.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Hashable, Iterable, Optional, Tuple


class MergeCache:
    """Pass the same instance to successive ``merge(..., cache=cache)`` calls."""

    def __init__(self, max_entries: Optional[int] = None):
        self._entries: "OrderedDict[Hashable, Any]" = OrderedDict()          # -> Prepared (one module)
        self._stacked: "OrderedDict[Hashable, Tuple[Any, list]]" = OrderedDict()  # -> (Prepared, members)
        self._members: Dict[Hashable, Hashable] = {}          # module key -> stacked-batch key
        self._norms: Dict[Hashable, float] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self.stacked_hits = 0
        self.stacked_misses = 0

    # ---- module entries
    def get(self, key: Hashable) -> Optional[Any]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: Hashable, entry: Any) -> None:
        self._entries[key] = entry
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self._drop_stacked_of(old)

    # ---- stacked batches
    def get_stacked(self, key: Hashable) -> Optional[Any]:
        hit = self._stacked.get(key)
        if hit is None:
            self.stacked_misses += 1
            return None
        self.stacked_hits += 1
        self.hits += len(hit[1])          # every module of the batch is reused
        return hit[0]

    def put_stacked(self, key: Hashable, value: Any, members: Iterable[Hashable]) -> None:
        members = list(members)
        for m in members:
            self._drop_stacked_of(m)
        if self.max_entries is not None and len(members) > self.max_entries:
            return
        self._stacked[key] = (value, members)
        for m in members:
            self._members[m] = key
        if self.max_entries is not None:          # at most max_entries modules stacked, oldest dropped
            while len(self._members) > self.max_entries:
                _, (_, old) = next(iter(self._stacked.items()))
                self._drop_stacked_of(old[0])

    def _drop_stacked_of(self, member: Hashable) -> None:
        bkey = self._members.pop(member, None)
        if bkey is None:
            return
        hit = self._stacked.pop(bkey, None)
        for m in (hit[1] if hit is not None else ()):
            if self._members.get(m) == bkey:
                del self._members[m]

    # ---- norms of inactive inputs
    def get_norm(self, key: Hashable) -> Optional[float]:
        return self._norms.get(key)

    def put_norm(self, key: Hashable, value: float) -> None:
        self._norms[key] = value

    # ----
    def clear(self) -> None:
        self._entries.clear()
        self._stacked.clear()
        self._members.clear()
        self._norms.clear()
        self.hits = self.misses = self.stacked_hits = self.stacked_misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> Dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                "stacked": len(self._stacked), "stacked_hits": self.stacked_hits,
                "stacked_misses": self.stacked_misses}
