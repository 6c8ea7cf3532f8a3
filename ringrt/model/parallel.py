"""Running the model over a sharded sequence: the attention it is given, how a batch is sharded,
the loss over the whole sequence, and the gradient all-reduce. The model file itself
(``llama.py``) never touches ``torch.distributed``; everything here is injected into it.

Shapes: a batch of token sequences is (B, S + 1); the model reads tokens [0, S) and predicts
[1, S + 1). Both are sharded in the same layout, so every rank scores exactly its own tokens and
no label crosses a shard boundary.

Packed documents (``data.pack_documents``): a batch that is not a tensor but has ``packed()``
(``ringrt.data.packing.PackedBatch``) is one packed sequence of documents, its B rows flattened into
one (B = 1, as flash-attn's varlen users do: ``ringrt.attention`` takes one ``cu_seqlens`` for every
batch row, and rows' boundaries differ). :func:`shard_batch` cuts it per document (Note [document
layout] in ``ringrt/ops/documents.py``), the shard's positions restart in every document, and its
``cu_seqlens`` goes to the attention (``Llama.forward(..., cu_seqlens=)``); padding rows are labelled -100.

``group`` everywhere here is what ``ringrt.attention`` takes: None (the default group), a
``ProcessGroup``, or a 1-D ``DeviceMesh`` (``mesh["sp"]`` of a larger one) meaning its process group.
Under FSDP2 (``fully_shard``) the sequence shards' gradients must be summed, not averaged: see
:func:`sequence_loss` for the divide factor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import api
from ..distributed import comm
from ..distributed.groups import base_group, new_subgroups
from ..ops.documents import Documents, lengths_of, shard_documents
from ..ops.layout import check_layout, num_chunks, positions as layout_positions, shard_of
from .config import AttentionConfig, ModelConfig
from .loss import chunked_cross_entropy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class RingAttend:
    """Exact causal attention over the sharded sequence with one of ``ringrt.ALGORITHMS``."""

    rotates = False
    documents = True  # takes cu_seqlens: shards cut per document (shard_batch of a packed batch)

    def __init__(self, *, algorithm: str, layout: str, group: dist.ProcessGroup | DeviceMesh | None = None):
        self.algorithm, self.layout, self.group = algorithm, layout, group

    def __call__(self, q, k, v, *, layer, positions, cu_seqlens=None):
        return api.attention(q, k, v, causal=True, algorithm=self.algorithm, layout=self.layout, group=self.group,
                             cu_seqlens=cu_seqlens)


class LambdaAttend:
    """LM-Infinite Λ-mask attention over contiguous shards; rotates q/k itself (HF RoPE)."""

    rotates = True

    def __init__(self, *, mask, rope_theta: float, group: dist.ProcessGroup | DeviceMesh | None = None):
        self.mask, self.rope_theta, self.group = mask, rope_theta, group

    def __call__(self, q, k, v, *, layer, positions):
        from ..lm_infinite import lambda_attention

        return lambda_attention(q, k, v, mask=self.mask, rope_theta=self.rope_theta, group=self.group)


def lambda_mask(attn: AttentionConfig, train_len: int):
    """The ``ringrt.LambdaMask`` of these settings (n_local defaults to the training length)."""
    from ..lm_infinite import LambdaMask

    n_local = attn.n_local or train_len
    return LambdaMask(n_global=attn.n_global, n_local=n_local, limit_distance=attn.limit_distance or n_local)


def make_attend(attn: AttentionConfig, model: ModelConfig, *, train_len: int, group: dist.ProcessGroup | DeviceMesh | None = None):
    """The attention the model runs with under ``attn`` (plain ring or Λ-mask) over ``group``."""
    layout = attn.resolved_layout()
    if attn.lambda_mask:
        if layout != "contiguous":
            raise ValueError(f"attention.layout={layout!r} cannot be used with attention.lambda_mask=true; valid: 'contiguous'")
        return LambdaAttend(mask=lambda_mask(attn, train_len), rope_theta=model.rope_theta, group=group)
    if attn.algorithm not in api.ALGORITHMS:
        raise ValueError(f"attention.algorithm={attn.algorithm!r} is not known; valid: {', '.join(api.ALGORITHMS)}")
    if base_group(group)[2] == 1:
        return None  # the whole sequence is here: the model's own causal attention
    return RingAttend(algorithm=attn.algorithm, layout=layout, group=group)


@dataclass(frozen=True, slots=True)
class Shard:
    input_ids: torch.Tensor  # (B, S_local) int64
    labels: torch.Tensor  # (B, S_local) int64, -100 where nothing is scored
    positions: torch.Tensor  # (S_local,) int64 absolute positions (in-document positions when packed)
    cu_seqlens: torch.Tensor | None = None  # packed: (n + 1,) int64 on the CPU, documents of the whole sequence

    def to(self, device: torch.device | str) -> "Shard":
        """The same shard on ``device`` (the model's): ids, labels and positions move together
        (``cu_seqlens`` stays on the CPU: the attention reads its values on the host)."""
        return Shard(*(t.to(device) for t in (self.input_ids, self.labels, self.positions)), self.cu_seqlens)


def shard_batch(tokens, *, layout: str, group: dist.ProcessGroup | DeviceMesh | None = None,
                device: torch.device | str | None = None) -> Shard:
    """This rank's shard of a batch ``tokens`` (B, S + 1) held in full by every rank of ``group``.

    The shard is cut where ``tokens`` lives (the data pipeline's CPU batch: only this rank's tokens
    then cross to the accelerator) and moved to ``device`` (the model's) when given; its positions
    are on the shard's device. S must be a multiple of W (contiguous) or 2W (zigzag); ValueError otherwise.

    ``tokens`` may also be a packed batch (``ringrt.data.packing.PackedBatch``, anything whose
    ``packed()`` returns (input_ids, labels, cu_seqlens)): see :func:`shard_packed`.
    """
    if not isinstance(tokens, torch.Tensor):
        ids, labels, cu = tokens.packed()
        return shard_packed(ids, labels, cu, layout=layout, group=group, device=device)
    _, rank, world = base_group(group)
    seq = tokens.shape[1] - 1
    n = num_chunks(layout, world)
    if seq < 1 or seq % n:
        raise ValueError(
            f"sequence length {seq} cannot be split by layout={layout!r} over {world} ranks: it must be a "
            f"positive multiple of {n}; choose a length such as {max(n, seq - seq % n)}"
        )
    ids = shard_of(tokens[:, :-1], layout, rank, world, dim=1)
    labels = shard_of(tokens[:, 1:], layout, rank, world, dim=1)
    sh = Shard(ids, labels, layout_positions(layout, rank, world, ids.shape[1]).to(tokens.device))
    return sh if device is None else sh.to(device)


def shard_packed(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, *, layout: str,
                 group: dist.ProcessGroup | DeviceMesh | None = None, device: torch.device | str | None = None) -> Shard:
    """This rank's shard of a packed sequence: input_ids and labels (B, N) (B = 1 for a flattened
    batch) of documents ``cu_seqlens`` ([0, L_0, L_0 + L_1, ..., N]; one for every row).

    Each document is cut on its own (``ringrt.shard(..., cu_seqlens=)``: padded at its end to a
    multiple of 2W, or W, input 0 and label -100 there), positions restart at 0 in every document
    (``ringrt.positions(..., cu_seqlens=)``), and the shard carries ``cu_seqlens`` for the attention.
    On one rank the rows stay as they are (no padding), as the model's own attention reads them.
    The shard's length depends on the documents (every rank's is the same)."""
    check_layout(layout)
    _, rank, world = base_group(group)
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    docs = Documents(lengths_of(cu), layout if world > 1 else "contiguous", world)
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must both be (B, N)")
    ids = shard_documents(input_ids, docs, rank, dim=1, value=0)
    lab = shard_documents(labels, docs, rank, dim=1, value=-100)
    sh = Shard(ids, lab, docs.local_positions(rank).to(ids.device), cu)
    return sh if device is None else sh.to(device)


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, *, channel: str, step=None) -> None:
    """Sum ``x`` in place over ``group``, as a ringrt collective: bounded by ``RINGRT_P2P_TIMEOUT``
    (or 300 s) on gloo, stream-ordered on NCCL; a failure is a ``ringrt.CommError`` /
    ``ringrt.CommTimeout`` naming the rank, the all_reduce, ``channel`` and ``step``."""
    comm.collective("all_reduce", lambda: dist.all_reduce(x, group=group, async_op=True), group=group, device=x.device,
                    timeout_s=None, channel=channel, step=step)


class _GroupSum(torch.autograd.Function):
    """Sum over the ranks of a group; the gradient passes through unchanged (every rank's copy of
    the sum receives the same upstream gradient, which is d sum / d own term)."""

    @staticmethod
    def forward(ctx, x, group, channel, step):
        y = x.detach().clone()
        all_reduce(y, group, channel=channel, step=step)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


def group_sum(x: torch.Tensor, group: dist.ProcessGroup | DeviceMesh | None = None, *, channel: str = "group_sum", step=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group`` (differentiable; see :class:`_GroupSum`)."""
    g, _, world = base_group(group)
    return x if world == 1 else _GroupSum.apply(x, g, channel, step)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | DeviceMesh | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over every scored token of the whole sharded sequence.

    logits (B, S_local, V), labels (B, S_local) with -100 = not scored. Every rank returns the same
    value, equal to the one-process loss; backward leaves on each rank the gradient of its own
    tokens' share, so summing parameter gradients over the group gives the full gradient
    (:func:`sum_gradients`). Under FSDP2 (``fully_shard``) FSDP's reduce-scatter does that sum, but
    divided by the number of ranks it reduces over (right for data parallelism, where each rank's loss
    is a mean over its own batch). Sequence shards of one batch must be summed, so call
    ``set_gradient_divide_factor(d)`` with d the number of data-parallel replicas (1.0 when FSDP
    shards over the sequence group alone) on every module ``fully_shard`` wrapped: the setting is per
    module, the root's does not reach its children.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()  # (B, S_local, V), at least fp32
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return _mean_over_group(total, labels, group)


def chunked_sequence_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          group: dist.ProcessGroup | DeviceMesh | None = None, *, chunk: int = 4096) -> torch.Tensor:
    """:func:`sequence_loss` of ``hidden @ weight.T`` without the (S_local, V) logits: hidden (B,
    S_local, dim) the model's final hidden states (``Llama.forward(..., hidden_only=True)``), weight
    (V, dim) its ``lm_head.weight``, labels (B, S_local). The LM head and the cross-entropy run
    ``chunk`` tokens at a time, forward and backward (``ringrt.model.loss``): at most chunk x V
    logits exist at once. Same value and gradients as the unchunked loss, to rounding."""
    total = chunked_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), chunk=chunk)
    return _mean_over_group(total, labels, group)


def _mean_over_group(total: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Sum of the ranks' losses over the sum of their scored tokens (every rank gets the same value)."""
    count = (labels != -100).sum().to(total.dtype)
    return group_sum(total, group, channel="loss", step="sum of the loss") / group_sum(
        count, group, channel="loss", step="count of the scored tokens").clamp_min(1)


def sum_gradients(params, group: dist.ProcessGroup | DeviceMesh | None = None, *, divide_by: int = 1) -> None:
    """All-reduce (sum) the gradients of ``params`` over ``group`` in one flat buffer, then divide."""
    g, _, world = base_group(group)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if world > 1:
        flat = torch.cat([t.reshape(-1) for t in grads])
        all_reduce(flat, g, channel="grads", step="sum of the gradients")
        offset = 0
        for t in grads:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    if divide_by != 1:
        for t in grads:
            t.div_(divide_by)


def mesh(data_parallel: int, *, hybrid_degrees: Sequence[int] | None = None) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None, int, int]:
    """(sequence group, data group, data rank, sequence world) of a (data x sequence) mesh.

    Ranks [i*sp, (i+1)*sp) shard one sequence (sp = world / data_parallel); rank r is replica
    r // sp. Every rank must call this (group creation is collective). Without distributed: all None.

    Each sequence group comes with its two dedicated lanes (``ringrt.distributed.groups.new_subgroups``):
    NCCL ignores P2P tags, so ringrt's concurrent channels need communicators of their own.
    ``hybrid_degrees``: the Ulysses degrees whose grids to create for ``algorithm="hybrid"``; default
    on NCCL every degree the hybrid can pick (the divisors of sp below it, at most
    ``LOCAL_WORLD_SIZE``, or ``RINGRT_ULYSSES_DEGREE``), on gloo none (tags keep channels apart there).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if data_parallel != 1:
            raise ValueError(f"train.data_parallel={data_parallel} needs a process group of a multiple of {data_parallel} ranks; this is one process")
        return None, None, 0, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    if data_parallel < 1 or world % data_parallel:
        raise ValueError(f"train.data_parallel={data_parallel} must divide the world size {world}; valid: "
                         f"{[d for d in range(1, world + 1) if world % d == 0]}")
    sp = world // data_parallel
    if data_parallel == 1:
        return dist.group.WORLD, None, 0, sp
    if hybrid_degrees is None:
        hybrid_degrees = _hybrid_candidates(sp) if comm.is_nccl(dist.group.WORLD) else ()
    seq_group = new_subgroups([list(range(i * sp, (i + 1) * sp)) for i in range(data_parallel)], hybrid_degrees=hybrid_degrees)
    data_group = None
    for j in range(sp):
        g = dist.new_group(list(range(j, world, sp)))
        if rank % sp == j:
            data_group = g
    return seq_group, data_group, rank // sp, sp


def _hybrid_candidates(sp: int) -> list[int]:
    """The Ulysses degrees ``schedules.hybrid.hybrid_degree`` can pick for a group of sp ranks that
    need a grid (1 < u < sp)."""
    env = os.environ.get("RINGRT_ULYSSES_DEGREE")
    if env:
        return [int(env)] if 1 < int(env) < sp and sp % int(env) == 0 else []
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", sp))
    return [u for u in range(2, sp) if sp % u == 0 and u <= per_node]
