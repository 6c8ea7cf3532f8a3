"""Routes: computations other than the schedules that run inside the custom ops of ``op.py``.

A route is a whole call, checks and agreement included, behind ``ringrt::attention_fwd`` / ``_bwd``
under the name in ``Call.algorithm``; its settings travel in ``Call.options`` (ints) and its further
input tensors in ``extra``. It is registered here by a package above this one at import (the Λ-mask
of ``ringrt.attention(..., window=...)``: ``ringrt.lm_infinite.route``), since the schedules never
import those packages. A route name is never an ``algorithm=`` a caller can pass: ``ringrt.attention``
chooses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import Spec


@dataclass(frozen=True, slots=True)
class Route:
    """One route: its raw passes over (B, S_l, H, D) shards and the specs of what it keeps."""

    # (q, k, v, extra, call) -> (out, lse, kept), after its own checks and agreement
    forward: Callable[..., tuple]
    # (dout, dlse or None, q, k, v, extra, out, lse, kept, call) -> (dq, dk, dv)
    backward: Callable[..., tuple]
    # (q, k, rank, world, options) -> specs of kept (``base.Spec``); [] where the call will raise
    kept: Callable[..., list[Spec]]


ROUTES: dict[str, Route] = {}


def register(name: str, route: Route) -> None:
    """Make ``route`` run the op calls whose ``Call.algorithm`` is ``name``."""
    ROUTES[name] = route
