"""Public entry points: ``attention``, ``shard``, ``unshard``."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .distributed import comm
from .distributed.agree import agree, local_problem, needs_backward
from .distributed.groups import base_group, nccl_problem, ring_groups
from .lm_infinite import LambdaMask, sliding_window
from .lm_infinite.attention import rotated_lambda_attention
from .ops import layout as _layout
from .ops.kernels import get_kernel
from .schedules import ALGORITHMS
from .schedules.base import TOPOLOGIES, RingPlan
from .schedules.hybrid import runtime_degree


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
    window: int | LambdaMask | None = None,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: (batch, local_seq, heads, head_dim), this rank's shard of the queries. q, k, v are plain
            tensors: a ``DTensor`` is refused on every rank (pass its ``to_local()`` shard).
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
        timeout: seconds (positive, finite) a transfer or collective may wait for a peer before
            raising ``CommTimeout``; None: ``RINGRT_P2P_TIMEOUT`` or 300. There is no "no limit"
            value (0 is an error). Applies on gloo; on NCCL waits are stream-ordered and the
            process group's own timeout and watchdog catch a hang.
        group: process group over which the sequence is sharded; default the default group. A 1-D
            ``DeviceMesh`` (or a slice ``mesh["sp"]`` of a larger one) means its process group; a mesh
            of more dimensions, or anything but None, a ``ProcessGroup`` or a 1-D mesh, is a
            ``ValueError``. With no process group initialised, or a group of one rank, this is plain
            attention. A subgroup on NCCL needs its dedicated lanes (``ringrt.distributed.groups.new_subgroups``,
            ``ringrt.model.parallel.mesh``, or ``register`` for a mesh's group; see ``ringrt/distributed/groups.py``).
        window: restrict each query to a window of keys, on q and k as given (already rotated, as a
            Hugging Face model has them). An int w: causal sliding window, query i sees keys
            i - w + 1 .. i (Mistral's and Qwen2's ``sliding_window = w``). A :class:`ringrt.LambdaMask`:
            LM-Infinite's Λ-mask (the first n_global tokens plus the window; see
            :func:`ringrt.lambda_attention`). Runs on contiguous shards (``layout`` must be
            ``"contiguous"``, its default here) with ``causal=True``, skipping every block the window
            empties and moving only a halo; ``algorithm`` ``"ring"`` (halo K/V travel; ``"auto"``
            picks it) or ``"tokenring"`` (queries travel, K/V stay), the others are refused.
        inv_freq: (head_dim/2,) the RoPE frequencies q and k were rotated with, token i of the full
            sequence at position i; needed only by a LambdaMask with n_global > 0 (its global branch
            re-rotates q to min(limit_distance, i) and k to 0), ignored otherwise.

    Returns:
        (batch, local_seq, heads, head_dim): this rank's output shard, dtype of q, differentiable
        w.r.t. q, k, v. Accumulation is in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError on every rank, before any transfer, if any rank's inputs or ``timeout`` are
        invalid, the ranks disagree on shapes, dtypes, settings or whether a backward will follow
        (grad mode and ``requires_grad``), or an NCCL subgroup lacks its dedicated groups.
        ``ringrt.CommTimeout`` / ``ringrt.CommError`` if a peer does not answer in time or its
        connection closes (naming this rank, the peer or collective, the channel and the step).
    """
    if window is not None:
        return _windowed(q, k, v, causal=causal, algorithm=algorithm, layout=layout, softmax_scale=softmax_scale, topology=topology,
                         kernel=kernel, timeout=timeout, group=group, window=window, inv_freq=inv_freq)
    if layout is None:
        layout = "zigzag" if causal else "contiguous"
    base, rank, world = base_group(group)
    # A bad timeout is this rank's problem, agreed on like any other; the agreement itself then
    # waits the default so that the other ranks hear about it.
    problem = comm.timeout_problem(timeout)
    to = comm.resolve_timeout(None if problem else timeout)
    problem = problem or local_problem(
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
        (q, k, causal, algorithm, ALGORITHMS, layout, topology, TOPOLOGIES, softmax_scale, needs_backward(q, k, v)),
        "ringrt.attention", to, q.device if isinstance(q, torch.Tensor) else None,
    )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # after the agreement: creating groups needs every rank present (a bounded rendezvous first)
    groups = ring_groups(group, timeout_s=to, device=q.device)
    plan = RingPlan(causal=causal, layout=layout, scale=float(scale), kernel=kern, groups=groups,
                    topology=topology, timeout=to)
    return ALGORITHMS[algorithm](q, k, v, plan)


WINDOW_ALGORITHMS = {"ring": "ring", "tokenring": "tokenring", "auto": "ring"}
"""``algorithm`` with ``window=``: the Λ ring's way of crossing shard boundaries."""


def _windowed(q, k, v, *, causal, algorithm, layout, softmax_scale, topology, kernel, timeout, group, window, inv_freq):
    """``attention(..., window=...)``: the Λ ring on rotated q/k (``ringrt.lm_infinite``)."""
    problem, mask = None, sliding_window(1)  # the placeholder mask is never run: a problem stops every rank first
    if isinstance(window, LambdaMask):
        mask = window
    elif isinstance(window, int) and not isinstance(window, bool) and window >= 1:
        mask = sliding_window(window)
    else:
        problem = f"window={window!r} must be a positive int (a causal sliding window of that many keys) or a ringrt.LambdaMask"
    if problem is None and causal is not True:
        problem = f"causal={causal!r} cannot be used with window=: windowed attention is causal; valid: True"
    if problem is None and layout not in (None, "contiguous"):
        problem = (f"layout={layout!r} cannot be used with window=: windowed attention runs on contiguous shards; valid: 'contiguous' "
                   "(ringrt.shard(x, layout='contiguous'))")
    if problem is None and topology != "full":
        problem = f"topology={topology!r} cannot be used with window=: the halo goes straight to its neighbours; valid: 'full'"
    if problem is None and algorithm not in WINDOW_ALGORITHMS:
        problem = (f"algorithm={algorithm!r} cannot be used with window=: windowed attention runs on the Λ ring; "
                   f"valid: {', '.join(map(repr, WINDOW_ALGORITHMS))}")
    return rotated_lambda_attention(q, k, v, mask=mask, inv_freq=inv_freq, softmax_scale=softmax_scale,
                                    algorithm=WINDOW_ALGORITHMS.get(algorithm, "ring"), kernel=kernel, timeout=timeout,
                                    group=group, problem=problem, what="ringrt.attention")


def _groups_problem(group, q, k, algorithm: str) -> str | None:
    """What the process groups lack for ``algorithm`` over NCCL (see ``ringrt.distributed.groups.nccl_problem``):
    the collectives-only schedules need nothing beyond the base group."""
    if algorithm in ("allgather", "ulysses"):
        return None
    base, _, world = base_group(group)
    u = runtime_degree(world, q.shape[2], k.shape[2]) if algorithm == "hybrid" else None
    return nccl_problem(base, q.device, hybrid_degree=u)


def shard(x: torch.Tensor, *, layout: str, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` (every rank passes the same full tensor).

    The length of ``dim`` must be a multiple of W (contiguous) or 2W (zigzag); see
    :func:`ringrt.pad_to_multiple`.
    """
    _, rank, world = base_group(group)
    return _layout.shard_of(x, layout, rank, world, dim)


def unshard(x_local: torch.Tensor, *, layout: str, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The full tensor from every rank's shard (an all_gather; not differentiable). Waits at most
    ``RINGRT_P2P_TIMEOUT`` (or 300) seconds on gloo; failures raise ``ringrt.CommError``."""
    _layout.check_layout(layout)
    g, _, world = base_group(group)
    if world == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(world)]
    local = x_local.contiguous()
    comm.collective("all_gather", lambda: dist.all_gather(parts, local, group=g, async_op=True), group=g,
                    device=local.device, timeout_s=None, channel="unshard")
    return _layout.assemble(parts, layout, dim)
