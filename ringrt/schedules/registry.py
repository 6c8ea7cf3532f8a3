"""The one table of schedules: name -> :class:`base.Pass` over (B, S_l, H, D) shards.

``ringrt.attention(algorithm=name)`` runs ``SCHEDULES[name]`` (or ``auto``, which picks one of
them per call); ``auto`` prices each with the cost model (``costmodel.SCHEDULES`` names the same
schedules, in the same order) and runs the one it picks from this table. The order is part of the
contract: ``auto`` tells the ranks its choice by index into it.
"""

from __future__ import annotations

from .allgather import allgather_pass
from .base import Pass
from .hybrid import hybrid_pass
from .ring import ring_pass
from .tokenring import tokenring_pass
from .ulysses import ulysses_pass

SCHEDULES: dict[str, Pass] = {
    "tokenring": tokenring_pass,
    "ring": ring_pass,
    "allgather": allgather_pass,
    "ulysses": ulysses_pass,
    "hybrid": hybrid_pass,
}
