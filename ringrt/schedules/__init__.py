"""Sequence-parallel attention schedules: everything behind ``ringrt.attention(..., algorithm=...)``.

Each schedule takes this rank's (B, S_l, H, D) shards and a :class:`base.RingPlan` and returns its
output shard and lse, in three layers: raw ``*_forward/_backward`` passes on heads-first tensors ->
a :class:`base.Pass` on the public layout (registered by name) -> one custom op with its autograd
(``op.py``), which ``ringrt.attention`` calls.

Read in this order:

* ``blocks.py``          the :class:`~blocks.Block` rectangle and the row slicer every pass uses (pure integers).
* ``base.py``            the plan, the pass protocol, and the block loops (kernel + merge).
* ``tokenring_plan.py``  Note [TokenRing]: which block each rank computes at each step (pure integers).
* ``tokenring.py``       TokenRing: queries travel one way, partial results straight back.
* ``ring.py``            KV-ring: K/V rotate round the ring (zigzag-balanced); dK/dV travel with them.
* ``allgather.py``       gather K/V once (Llama-3 context parallelism); reduce-scatter dK/dV.
* ``ulysses.py``         all-to-all from sequence shards to head shards and back (DeepSpeed-Ulysses).
* ``hybrid.py``          Ulysses inside groups of u ranks x KV-ring across the groups.
* ``registry.py``        the one table name -> schedule.
* ``auto.py``            picks a schedule per call from ``costmodel.py`` (and ``tiling.py``), pure math.
* ``call.py``            one call's settings, checked and agreed on by every rank, and its plan.
* ``routes.py``          the table of routes: whole calls a package above registers into the ops (``window=``).
* ``op.py``              the custom ops ``ringrt::attention_fwd`` / ``_bwd`` (torch.compile sees one opaque op).

May import: ``ringrt.ops`` (kernels, merge, layout) and ``ringrt.distributed`` (traffic, groups).
Never ``ringrt.simulate``, ``ringrt.bench``, ``ringrt.jobs`` or ``ringrt.model``.
"""

from .auto import auto_pass
from .registry import SCHEDULES

# Every ``algorithm=`` name: the schedules, then ``auto`` (which picks among them).
ALGORITHMS = {**SCHEDULES, "auto": auto_pass}

__all__ = ["ALGORITHMS", "SCHEDULES"]
