"""The one table of schedules: name -> ``fn(q, k, v, plan)`` on (B, S_l, H, D) shards.

``ringrt.attention(algorithm=name)`` runs ``SCHEDULES[name]`` (or ``auto``, which picks one of
them per call); ``auto`` prices each with the cost model (``costmodel.SCHEDULES`` names the same
schedules, in the same order) and runs the one it picks from this table. The order is part of the
contract: ``auto`` tells the ranks its choice by index into it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .allgather import allgather_attention
from .hybrid import hybrid_attention
from .ring import ring_attention
from .tokenring import tokenring_attention
from .ulysses import ulysses_attention

Schedule = Callable[..., torch.Tensor]

SCHEDULES: dict[str, Schedule] = {
    "tokenring": tokenring_attention,
    "ring": ring_attention,
    "allgather": allgather_attention,
    "ulysses": ulysses_attention,
    "hybrid": hybrid_attention,
}
