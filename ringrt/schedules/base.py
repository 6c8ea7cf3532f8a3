"""What every schedule shares: the plan of a call, the pass protocol, and the block loops.

A schedule is a :class:`Pass`: a raw forward and backward over this rank's shards in the public
(B, S_l, H, D) layout, without autograd (``ringrt.schedules.op`` makes them one custom op)::

    forward(q, k, v, plan)                                -> (out, lse, kept)
    backward(dout, q, k, v, out, lse, kept, plan)         -> (dq, dk, dv)

out (B, S_l, H, D) in q's dtype, lse (B, H, S_l) in fp32 (fp64 for fp64 inputs), the natural-log
sum-exp of each query row's scaled scores over every key it attended; None when the pass would have
to move it and ``plan.return_lse`` is False (Ulysses computes it head-sharded). ``kept`` is a list of
further tensors the forward hands to the backward (Ulysses keeps its head-sharded copies, the Λ-mask
pass the halo and global K/V it received); the plain schedules keep none. Between forward and
backward a call holds exactly q, k, v, out, lse and ``kept``. ``Pass.kept`` gives the (shape, dtype)
of each kept tensor from the input shapes, the rank and the settings alone (a None size: known only
at run time), for tracing.
In the backward, ``plan.dlse`` is the gradient of lse (or None): every schedule folds it into delta
(``ops.merge.grad_delta``).

Most schedules are written heads-first, on (B, H, S, D) tensors: :func:`seq_first_pass` turns a
heads-first pair into a :class:`Pass` (contiguous heads-first copies in the forward, views of the
saved tensors in the backward; the results back in (B, S_l, H, D)).

Inside a pass, :func:`attend_blocks` and :func:`grad_blocks` are the block loops: one kernel call
per :class:`~.blocks.Block` on row slices, merged into fp32 (out, lse) accumulators (forward) or
added into dq/dk/dv (backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..distributed.groups import RingGroups
from ..ops.documents import Documents
from ..ops.kernels import BlockKernel
from ..ops.merge import merge_
from .blocks import Block, rows

TOPOLOGIES = ("full", "ring")


@dataclass(frozen=True, slots=True)
class RingPlan:
    """Everything a ``ringrt.attention`` pass needs besides the tensors (every schedule takes it)."""

    causal: bool
    layout: str
    scale: float
    kernel: BlockKernel
    groups: RingGroups
    topology: str = "full"  # one of TOPOLOGIES: "ring" keeps every transfer between neighbours
    timeout: float | None = None
    backward: bool = False  # a backward will follow (``auto`` prices and measures with it)
    return_lse: bool = False  # the caller wants lse: passes that would have to move it do
    dlse: torch.Tensor | None = None  # backward only: the gradient of lse (B, H, S_l), or None
    documents: Documents | None = None  # packed documents (the kernel is then a DocumentKernel), or None


Forward = Callable[..., Sequence[torch.Tensor]]
Backward = Callable[..., Sequence[torch.Tensor]]
Spec = tuple[tuple[int | None, ...], torch.dtype]  # (shape, dtype); a None size is known at run time only


def no_kept(q: torch.Tensor, k: torch.Tensor, rank: int, world: int, options: tuple[int, ...]) -> list[Spec]:
    """The kept tensors of a pass that keeps none."""
    return []


@dataclass(frozen=True, slots=True)
class Pass:
    """One schedule: raw passes over (B, S_l, H, D) shards (see the module note)."""

    forward: Callable[..., tuple]  # (q, k, v, plan) -> (out, lse or None, kept)
    backward: Callable[..., tuple]  # (dout, q, k, v, out, lse, kept, plan) -> (dq, dk, dv)
    # (q, k, rank, world, options) -> specs of kept; ``options``: the call's integer settings (``call.Call``)
    kept: Callable[[torch.Tensor, torch.Tensor, int, int, tuple[int, ...]], list[Spec]] = no_kept


def swapped(x: torch.Tensor) -> torch.Tensor:
    """x with dims 1 and 2 swapped, (B, S, H, D) <-> (B, H, S, D), contiguous (a copy unless x already
    is that, a size-1 dim for instance)."""
    return x.transpose(1, 2).contiguous()


def seq_first_pass(forward: Forward, backward: Backward, inner: Callable = lambda plan: plan) -> Pass:
    """A :class:`Pass` from a heads-first pair ``forward(q, k, v, p) -> (out, lse, *kept)``,
    ``backward(dout, q, k, v, out, lse, *kept, p) -> grads`` with p = ``inner(plan)``. Nothing of its
    own is kept: the backward reads q, k, v, dout and out as heads-first views of the saved tensors."""

    def seq_forward(q, k, v, plan):
        out, lse, *kept = forward(swapped(q), swapped(k), swapped(v), inner(plan))
        return swapped(out), lse, list(kept)

    def seq_backward(dout, q, k, v, out, lse, kept, plan):
        dout, q, k, v, out = (x.transpose(1, 2) for x in (dout, q, k, v, out))  # (B, H, S, D) views: no copies
        return tuple(swapped(g) for g in backward(dout, q, k, v, out, lse, *kept, inner(plan)))

    return Pass(seq_forward, seq_backward)


def attend_blocks(
    acc: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: Iterable[Block],
    *, kernel: BlockKernel, scale: float, chunk: int = 1, mask: torch.Tensor | None = None,
) -> None:
    """Merge the attention of q's rows ``b.q_rows`` over k/v's rows ``b.k_rows``, for each block b,
    into ``acc`` = (out (B, H, S, D), lse (B, H, S)) fp32/fp64 accumulators of q's rows, in place.

    Rows are in units of ``chunk`` tokens; ``mask``: an additive bias for a single block."""
    for b in blocks:
        o, lse = kernel.forward(rows(q, b.q_rows, chunk), rows(k, b.k_rows, chunk), rows(v, b.k_rows, chunk),
                                causal=b.diagonal, mask=mask, scale=scale)
        merge_(rows(acc[0], b.q_rows, chunk), rows(acc[1], b.q_rows, chunk), o, lse)


def grad_blocks(
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, blocks: Iterable[Block],
    *, kernel: BlockKernel, scale: float, chunk: int = 1, mask: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> None:
    """Add each block's gradients into ``grads`` = (dq, dk, dv): rows ``b.q_rows`` of dq (shaped like
    q), rows ``b.k_rows`` of dk and dv (shaped like k and v), in place. dout, lse, delta (and ``out``,
    for kernels that want it) are rows of the queries, lse the final one. Units and ``mask`` as in
    :func:`attend_blocks`."""
    dq, dk, dv = grads
    for b in blocks:
        g_q, g_k, g_v = kernel.backward(
            rows(dout, b.q_rows, chunk), rows(q, b.q_rows, chunk), rows(k, b.k_rows, chunk), rows(v, b.k_rows, chunk),
            rows(lse, b.q_rows, chunk), rows(delta, b.q_rows, chunk), causal=b.diagonal, mask=mask, scale=scale,
            out=None if out is None else rows(out, b.q_rows, chunk),
        )
        rows(dq, b.q_rows, chunk).add_(g_q)
        rows(dk, b.k_rows, chunk).add_(g_k)
        rows(dv, b.k_rows, chunk).add_(g_v)
