"""Merge methods. Importing this package registers every built-in method.

Calling convention of ``MethodSpec.fn`` (what a new method file implements)::

    fn(tasks: TaskSet, params: dict, ctx: MethodContext) -> LowRankUpdate | DenseUpdate

- It is called by `domerge_core.engine.merge.merge` once per *batch*: N modules of equal shape that the
  same T ≥ 2 inputs (those with a non-zero strength) provide, with equal ranks.
- ``tasks.up`` (N, m, R) and ``tasks.down`` (N, R, n) hold the T tasks stacked (views per task:
  ``tasks.ups[i]``, ``tasks.downs[i]``); ``tasks.ups[i] @ tasks.downs[i]`` (N, m, n) is task i's update with everything the door does
  first already applied: format scale folded into up, balanced form and orthogonalization (if
  ``orthogonalize``), the decouple direction normalisation (if ``decouple``), and the user strength
  (``w_i``; with decouple ``w_i / max|w|``). So a method only *combines tasks*: ``ta`` stacks the
  factors, ``ties``/``dare`` materialise ``tasks.dense(i)`` for this batch only. ``tasks.up`` and
  ``tasks.down`` may be the cached factors themselves (`MergeCache`; the strengths ride on one
  factor only): never modify them in place, return new tensors (or the inputs unchanged).
- ``params`` is the resolved parameter dict (the method's own and the plug-in ones); ``ctx`` has
  ``seed`` (use `base.module_seed(ctx.seed, key, tasks.tags[i])` for random draws so results do
  not depend on batching or on the other inputs), ``device`` and ``dtype``.
- The door then recombines with the merged magnitude (decouple), multiplies by λ (``lam``),
  and writes the factors exactly or truncates them (rank / energy): a `LowRankUpdate` through QR +
  core SVD, a `DenseUpdate` through an SVD of each module.
- A module that only one active input provides is passed through as ``λ·w·ΔW`` by the door (every
  method is the identity on one input), and an input at strength 0 is dropped, so "strength 0
  removes a LoRA" holds exactly for every method.
- A method whose output is exactly low rank sets ``MethodSpec.lowrank=True`` (no m×n matrix).

Register with ``registry.register(MethodSpec(...))`` at import time, and import the module below.
"""
from __future__ import annotations

from . import plugins  # noqa: F401  (fills registry.PLUGIN_PARAMS first)
from . import ta, ties, dare, dare_ties, do  # noqa: F401  (registration)
from . import knots, core, tsv, iso, cart  # noqa: F401  (aligned low-rank methods)
from .base import DenseUpdate, LowRankUpdate, MethodContext, TaskSet  # noqa: F401
from .registry import (DEFAULT_METHOD, DEFAULT_WHY, PLUGIN_PARAMS, MethodSpec, Param,  # noqa: F401
                       default_method, get_method, list_methods, method_names, register)
