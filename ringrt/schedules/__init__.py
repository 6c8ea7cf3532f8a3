"""Sequence-parallel attention schedules that run behind ``ringrt.attention(..., algorithm=...)``.

One file per schedule, each in three layers (raw ``*_forward/_backward`` -> autograd Function ->
the registered ``fn(q, k, v, plan)`` on (B, S_l, H, D) shards):

* ``ring``      K/V rotate round the ring (zigzag-balanced for causal); dK/dV travel with them.
* ``allgather`` gather K/V once (Llama-3 context parallelism); reduce-scatter dK/dV.
* ``ulysses``   all-to-all from sequence shards to head shards and back (DeepSpeed-Ulysses).
* ``hybrid``    Ulysses inside groups of u ranks x KV-ring across the groups.
* ``auto``      picks one of the above or TokenRing per call from :mod:`ringrt.costmodel`.
"""

from .allgather import allgather_attention
from .auto import auto_attention
from .hybrid import hybrid_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

SCHEDULES = {
    "ring": ring_attention,
    "allgather": allgather_attention,
    "ulysses": ulysses_attention,
    "hybrid": hybrid_attention,
    "auto": auto_attention,
}

__all__ = ["SCHEDULES"]
