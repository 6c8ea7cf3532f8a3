"""``algorithm="auto"``: pick the schedule per call from the cost model.

The problem (batch, global sequence, heads, kv_heads, head_dim, dtype, causal, whether gradients
will be needed, layout, world size, ranks per node) goes to :func:`ringrt.simulate.costmodel.rank_schedules`
on this process's machine description: the calibration file of ``ringrt simulate calibrate``
(``RINGRT_CALIBRATION`` or ``~/.cache/ringrt/calibration.json``) on CPU, else the defaults; on CUDA
the ``RINGRT_MACHINE`` preset (default ``h100``). The fastest estimate wins; the choice and every
candidate's estimate go to ``logging.getLogger("ringrt.auto")`` at DEBUG.

Every rank must run the same schedule, yet calibration files could differ between nodes, so the
first call with a new problem broadcasts rank 0's choice (one small collective); later calls with the
same problem reuse it without communication.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from ..comm import count
from ..simulate import costmodel
from ..tokenring import TokenRingAttention
from .allgather import allgather_attention
from .hybrid import hybrid_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

log = logging.getLogger("ringrt.auto")

RUNNERS = {
    "tokenring": lambda q, k, v, plan: TokenRingAttention.apply(q, k, v, plan),
    "ring": ring_attention,
    "allgather": allgather_attention,
    "ulysses": ulysses_attention,
    "hybrid": hybrid_attention,
}
_CHOICES: dict[tuple, tuple[str, list]] = {}
_MACHINES: dict[str, costmodel.Machine] = {}


def machine_for(device: torch.device) -> costmodel.Machine:
    """The machine description ``auto`` prices schedules on for tensors on ``device``."""
    key = device.type
    if key not in _MACHINES:
        if device.type == "cuda":
            _MACHINES[key] = costmodel.PRESETS[os.environ.get("RINGRT_MACHINE", "h100")]
        else:
            _MACHINES[key] = costmodel.load_machine()
    return _MACHINES[key]


def problem_of(q: torch.Tensor, k: torch.Tensor, plan, world: int, backward: bool) -> costmodel.Problem:
    """The cost-model problem of shards q (B, S_l, H, D), k (B, S_l, H_kv, D)."""
    return costmodel.Problem(
        batch=q.shape[0], seq=q.shape[1] * world, heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[3],
        dtype_bytes=q.element_size(), causal=plan.causal, backward=backward, layout=plan.layout,
    )


def choose(p: costmodel.Problem, m: costmodel.Machine, world: int, topology: str = "full") -> tuple[str, list[costmodel.Estimate]]:
    """(chosen schedule, every candidate's estimate fastest first). Pure; no communication."""
    ests = costmodel.rank_schedules(p, m, world)
    if topology == "ring":  # no direct links: schedules that need them are priced but not picked
        ests = [e for e in ests if e.schedule not in ("ulysses", "hybrid", "allgather")] or ests
    return ests[0].schedule, ests


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
    """``algorithm="auto"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (B, S_l, H, D)."""
    g = plan.groups
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    p = problem_of(q, k, plan, g.world, backward)
    m = machine_for(q.device)
    key = (g.rank, g.world, id(g.base), q.device.type, plan.topology,
           *(getattr(p, f) for f in ("batch", "seq", "heads", "kv_heads", "head_dim", "dtype_bytes", "causal", "backward", "layout")))
    if key not in _CHOICES:
        name, ests = choose(p, m, g.world, plan.topology)
        if g.world > 1:
            names = list(RUNNERS)
            idx = torch.tensor([names.index(name)], dtype=torch.int64, device=q.device if q.device.type == "cuda" else "cpu")
            dist.broadcast(idx, group_src=0, group=g.base)
            n = idx.numel() * idx.element_size()
            if g.rank == 0:
                count("auto", sent=(g.world - 1) * n, recv=0, sends=g.world - 1, recvs=0)
            else:
                count("auto", sent=0, recv=n, sends=0, recvs=1)
            name = names[int(idx.item())]
        _CHOICES[key] = (name, ests)
    name, ests = _CHOICES[key]
    if log.isEnabledFor(logging.DEBUG):
        shown = ", ".join(f"{e.schedule}={e.total * 1e3:.3f}ms" for e in ests)
        log.debug(
            "auto: %s for B=%d S=%d H=%d H_kv=%d D=%d %s causal=%s %s W=%d layout=%s on %s; estimates: %s",
            name, p.batch, p.seq, p.heads, p.kv_heads, p.head_dim, q.dtype, p.causal,
            "fwd+bwd" if backward else "fwd", g.world, plan.layout, m.name, shown,
        )
    return RUNNERS[name](q, k, v, plan)
