"""Public entry points: ``attention``, ``shard``, ``unshard``."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from . import layout as _layout
from .comm import DEFAULT_TIMEOUT_S
from .groups import base_group, nccl_problem, ring_groups
from .kernels import get_kernel
from .schedules import SCHEDULES
from .schedules.hybrid import hybrid_degree
from .tokenring import TOPOLOGIES, RingPlan, TokenRingAttention
from .validate import agree, local_problem


def _tokenring(q, k, v, plan: RingPlan) -> torch.Tensor:
    return TokenRingAttention.apply(q, k, v, plan)


# name -> fn(q, k, v, plan) on (B, S, H, D) shards. Other schedules register here.
ALGORITHMS: dict[str, Callable[..., torch.Tensor]] = {"tokenring": _tokenring, **SCHEDULES}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    algorithm: str = "tokenring",
    layout: str | None = None,
    softmax_scale: float | None = None,
    topology: str = "full",
    kernel: str = "auto",
    timeout: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Exact softmax attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: (batch, local_seq, heads, head_dim), this rank's shard of the queries.
        k, v: (batch, local_seq, kv_heads, head_dim); ``heads`` a multiple of ``kv_heads``
            (GQA; 1 kv head is MQA). K/V heads are never replicated.
        causal: token i attends to tokens j <= i of the full sequence.
        algorithm: ``"tokenring"``, ``"ring"``, ``"allgather"``, ``"ulysses"``, ``"hybrid"`` or ``"auto"``
            (chosen per call by the cost model; see ``ringrt/schedules/``).
        layout: how the full sequence was sharded (see :func:`shard`). Default ``"zigzag"`` when
            causal (balanced work), ``"contiguous"`` otherwise.
        softmax_scale: default 1/sqrt(head_dim).
        topology: ``"full"`` — partial results go straight back to their owner (NVSwitch, one node,
            any fully connected fabric); ``"ring"`` — every transfer is between ring neighbours.
        kernel: local block kernel, ``"auto"`` (CUDA kernel on CUDA tensors, else the CPU one),
            ``"cpu"``, ``"cuda"`` or ``"math"``.
        timeout: seconds a transfer may wait for a peer before raising ``CommTimeout``
            (default ``RINGRT_P2P_TIMEOUT`` or 300). Applies on gloo; on NCCL waits are
            stream-ordered and the process group's own timeout and watchdog catch a hang.
        group: process group over which the sequence is sharded; default the default group. With
            no process group initialised, or a group of one rank, this is plain attention. A
            subgroup on NCCL needs dedicated direction groups (``ringrt.groups.new_subgroups`` or
            ``ringrt.model.parallel.mesh``; see ``ringrt/groups.py``).

    Returns:
        (batch, local_seq, heads, head_dim): this rank's output shard, dtype of q, differentiable
        w.r.t. q, k, v. Accumulation is in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError on every rank, before any transfer, if any rank's inputs are invalid, the ranks
        disagree on shapes, dtypes or settings, or an NCCL subgroup lacks its dedicated groups.
    """
    if layout is None:
        layout = "zigzag" if causal else "contiguous"
    base, rank, world = base_group(group)
    to = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    problem = local_problem(
        q, k, v, causal=causal, algorithm=algorithm, algorithms=ALGORITHMS, layout=layout,
        topology=topology, topologies=TOPOLOGIES, softmax_scale=softmax_scale, world=world,
    )
    if problem is None:
        try:
            kern = get_kernel(q.device, kernel)
            problem = _groups_problem(group, q, k, algorithm)
        except ValueError as e:
            problem = str(e)
    agree(
        base, rank, world, problem,
        (q, k, causal, algorithm, ALGORITHMS, layout, topology, TOPOLOGIES, softmax_scale),
        "ringrt.attention", to, q.device if isinstance(q, torch.Tensor) else None,
    )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    groups = ring_groups(group)  # after the agreement: creating groups needs every rank present
    plan = RingPlan(causal=causal, layout=layout, scale=float(scale), kernel=kern, groups=groups,
                    topology=topology, timeout=to)
    return ALGORITHMS[algorithm](q, k, v, plan)


def _groups_problem(group, q, k, algorithm: str) -> str | None:
    """What the process groups lack for ``algorithm`` over NCCL (see ``ringrt.groups.nccl_problem``):
    the collectives-only schedules need nothing beyond the base group."""
    if algorithm in ("allgather", "ulysses"):
        return None
    base, _, world = base_group(group)
    u = hybrid_degree(world, q.shape[2], k.shape[2]) if algorithm == "hybrid" else None
    return nccl_problem(base, q.device, hybrid_degree=u)


def shard(x: torch.Tensor, *, layout: str, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` (every rank passes the same full tensor).

    The length of ``dim`` must be a multiple of W (contiguous) or 2W (zigzag); see
    :func:`ringrt.pad_to_multiple`.
    """
    _, rank, world = base_group(group)
    return _layout.shard_of(x, layout, rank, world, dim)


def unshard(x_local: torch.Tensor, *, layout: str, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The full tensor from every rank's shard (an all_gather; not differentiable)."""
    _layout.check_layout(layout)
    g, _, world = base_group(group)
    if world == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local.contiguous(), group=g)
    return _layout.assemble(parts, layout, dim)
