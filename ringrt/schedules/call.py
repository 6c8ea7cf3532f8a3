"""One ``ringrt.attention`` call as the custom ops see it: its settings, their checks, and its plan.

Every setting is an argument of the ops ``ringrt::attention_fwd`` / ``_bwd`` (``op.py``), so each is
a str, float, int or bool (or a list of ints); the process group goes by its name
(:func:`ringrt.distributed.groups.group_name`), resolved here in this process. :class:`Call` holds
them in the ops' argument order.

Forward: :func:`setup` checks this rank's inputs and settings, agrees with the other ranks before
any transfer (once per signature: Note [agreement cache] in ``distributed/agree.py``), makes the
ring groups and returns the plan. Backward: :func:`backward_plan` rebuilds the plan with the lse
gradient (no checks and no communication: the groups exist).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..distributed import comm
from ..distributed.agree import agree, agreed, local_problem, remember, signature
from ..distributed.groups import by_name, cached, nccl_problem, ring_groups
from ..ops.document_kernel import DocumentKernel
from ..ops.documents import Documents
from ..ops.kernels import get_kernel
from ..ops.lse_grad import LseGradKernel
from . import ALGORITHMS
from .base import TOPOLOGIES, RingPlan
from .documents import documents_of
from .documents import problem as docs_problem
from .hybrid import runtime_degree


@dataclass(frozen=True, slots=True)
class Call:
    """The settings of one call, in the order of the ops' arguments after the tensors."""

    algorithm: str
    causal: bool
    layout: str
    softmax_scale: float | None  # None: 1/sqrt(head_dim)
    topology: str
    kernel: str
    timeout: float | None  # None: RINGRT_P2P_TIMEOUT or 300
    group: str  # the process group's name; "" without distributed
    backward: bool  # a backward will follow (grad mode on and an input requires grad)
    return_lse: bool
    options: tuple[int, ...] = ()  # integer settings: a route's, or (documents.DOCUMENTS,) for packed documents
    problem: str = ""  # what the caller found wrong with its arguments ("" = nothing): agreed on, then raised

    def args(self) -> tuple:
        """The settings as op arguments."""
        return (self.algorithm, self.causal, self.layout, self.softmax_scale, self.topology, self.kernel, self.timeout,
                self.group, self.backward, self.return_lse, list(self.options), self.problem)

    @classmethod
    def of(cls, *args) -> Call:
        """Inverse of :meth:`args`."""
        return cls(*args[:-2], tuple(args[-2]), args[-1])


def setup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call, extra: list[torch.Tensor] | None = None) -> RingPlan:
    """The plan of a forward, after every rank agreed that every rank's inputs are valid and alike.
    ``extra``: [cu_seqlens] for a call over packed documents (``documents.py``), else empty.

    Raises ValueError on every rank otherwise (see ``ringrt.attention``)."""
    base, rank, world = by_name(call.group)
    to = comm.resolve_timeout(call.timeout)
    problem = call.problem or local_problem(
        q, k, v, causal=call.causal, algorithm=call.algorithm, algorithms=ALGORITHMS, layout=call.layout,
        topology=call.topology, topologies=TOPOLOGIES, softmax_scale=call.softmax_scale, world=world,
    )
    kern = docs = None
    if problem is None:
        docs, problem = documents_of(call.options, extra or [], call.layout, world)
        problem = problem or (docs_problem(q, docs, call.causal) if docs is not None else None)
    if problem is None:
        try:
            kern = get_kernel(q.device, call.kernel)
            problem = _groups_problem(base, world, q, k, call.algorithm)
        except ValueError as e:
            problem = str(e)
    meta = (q, k, call.causal, call.algorithm, ALGORITHMS, call.layout, call.topology, TOPOLOGIES, call.softmax_scale,
            call.backward, call.return_lse, (len(docs.lengths), docs.checksum()) if docs is not None else (0, 0))
    sig = signature(meta) if problem is None and world > 1 else None
    known = cached(base) if world > 1 else None
    lane = known.agree if known is not None else None
    if sig is None or not agreed(lane, sig):
        agree(lane if lane is not None else base, rank, world, problem, meta, "ringrt.attention", to, q.device)
    # after the agreement: creating groups needs every rank present (a bounded rendezvous first)
    groups = ring_groups(base, timeout_s=to, device=q.device)
    if sig is not None:
        remember(groups.agree, sig)
    return _plan(q, call, kern, groups, to, docs=docs)


def backward_plan(q: torch.Tensor, call: Call, dlse: torch.Tensor | None, extra: list[torch.Tensor] | None = None) -> RingPlan:
    """The plan of the backward of a call whose forward passed :func:`setup`; ``dlse`` (B, H, S_l)
    is the gradient of lse or None. With ``return_lse`` the kernel takes delta as given
    (:class:`ringrt.ops.lse_grad.LseGradKernel`), on every rank alike, whatever its own dlse: the
    blocks it computes for another rank's queries carry that rank's delta."""
    base, _, _ = by_name(call.group)
    to = comm.resolve_timeout(call.timeout)
    kern = get_kernel(q.device, call.kernel)
    groups = ring_groups(base, timeout_s=to, device=q.device)
    docs, _ = documents_of(call.options, extra or [], call.layout, groups.world)
    return _plan(q, call, LseGradKernel(kern) if call.return_lse else kern, groups, to, dlse, docs)


def _plan(q, call: Call, kern, groups, to: float, dlse=None, docs: Documents | None = None) -> RingPlan:
    scale = call.softmax_scale if call.softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if docs is not None:
        kern = DocumentKernel(kern, docs.slots)
    return RingPlan(causal=call.causal, layout=call.layout, scale=float(scale), kernel=kern, groups=groups,
                    topology=call.topology, timeout=to, backward=call.backward, return_lse=call.return_lse, dlse=dlse,
                    documents=docs)


def _groups_problem(base, world: int, q, k, algorithm: str) -> str | None:
    """What the process groups lack for ``algorithm`` over NCCL (see ``ringrt.distributed.groups.nccl_problem``):
    the collectives-only schedules need nothing beyond the base group."""
    if algorithm in ("allgather", "ulysses"):
        return None
    u = runtime_degree(world, q.shape[2], k.shape[2]) if algorithm == "hybrid" else None
    return nccl_problem(base, q.device, hybrid_degree=u)
