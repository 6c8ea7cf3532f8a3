"""Packed documents in every schedule (Note [document layout] in ``ringrt/ops/documents.py``).

A call over documents carries ``Call.options == (DOCUMENTS,)`` and ``cu_seqlens`` as its one
``extra`` tensor. Its plan holds the :class:`~ringrt.ops.documents.Documents` and a
:class:`~ringrt.ops.document_kernel.DocumentKernel` around the block kernel; :func:`run` and
:func:`run_backward` put the shards chunk-major before the schedule and back after it (a local
gather of each tensor: no communication), so the schedules themselves never know.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops.documents import Documents, lengths_of, lengths_problem
from .base import Pass, RingPlan

DOCUMENTS = 1
"""``Call.options[0]`` of a call over packed documents."""


def is_documents(options) -> bool:
    return len(options) > 0 and options[0] == DOCUMENTS


def documents_of(options, extra: list[torch.Tensor], layout: str, world: int) -> tuple[Documents | None, str | None]:
    """(documents, None), (None, None) for a call without any, or (None, the problem with cu_seqlens)."""
    if not is_documents(options):
        return None, None
    cu = extra[0] if extra else None
    problem = lengths_problem(cu)
    if problem:
        return None, problem
    return Documents(lengths_of(cu), layout, world), None


def problem(q: torch.Tensor, docs: Documents, causal: bool) -> str | None:
    """Why this rank's shard does not fit ``docs``, or None."""
    if q.shape[1] != docs.local_len:
        n = docs.n_chunks
        return (f"local_seq={q.shape[1]} does not match cu_seqlens: {len(docs.lengths)} documents of {docs.total} tokens "
                f"cut into {n} chunks each (layout={docs.layout!r}, world size {docs.world}) give every rank "
                f"{docs.local_len} rows (each document padded to a multiple of {n}); cut the packed sequence with "
                f"ringrt.shard(x, layout={docs.layout!r}, cu_seqlens=cu_seqlens)")
    return None if causal else docs.padding_problem()


def _perm(docs: Documents, device) -> tuple[torch.Tensor, torch.Tensor]:
    p = docs.chunk_major()
    return p.to(device), torch.argsort(p).to(device)


def run(pass_: Pass, q, k, v, plan: RingPlan) -> tuple:
    """``pass_.forward`` over the chunk-major shards: (out, lse, kept) with out and lse as sharded."""
    if plan.documents is None:
        return pass_.forward(q, k, v, plan)
    to, back = _perm(plan.documents, q.device)
    out, lse, kept = pass_.forward(*(x.index_select(1, to) for x in (q, k, v)), plan)
    return out.index_select(1, back), None if lse is None else lse.index_select(2, back), kept


def run_backward(pass_: Pass, dout, q, k, v, out, lse, kept, plan: RingPlan) -> tuple:
    """``pass_.backward`` over the chunk-major shards; gradients as sharded."""
    if plan.documents is None:
        return pass_.backward(dout, q, k, v, out, lse, kept, plan)
    to, back = _perm(plan.documents, q.device)
    if plan.dlse is not None:
        plan = replace(plan, dlse=plan.dlse.index_select(2, to))
    grads = pass_.backward(*(x.index_select(1, to) for x in (dout, q, k, v, out)), lse.index_select(2, to), kept, plan)
    return tuple(g.index_select(1, back) for g in grads)
