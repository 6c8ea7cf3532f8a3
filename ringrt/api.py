"""Public entry points: ``attention``, ``shard``, ``unshard``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import comm
from .distributed.agree import is_dtensor, local_problem, needs_backward
from .distributed.groups import base_group, by_name, group_name
from .lm_infinite import LambdaMask, sliding_window
from .lm_infinite import route as _window_route
from .lm_infinite.attention import rotated_lambda_attention
from .ops import layout as _layout
from .ops.documents import Documents, assemble_documents, lengths_of, lengths_problem, shard_documents
from .ops.kernels import get_kernel
from .schedules import ALGORITHMS
from .schedules import op as _op
from .schedules.base import TOPOLOGIES
from .schedules.call import Call
from .schedules.documents import DOCUMENTS


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
    return_lse: bool = False,
    group: dist.ProcessGroup | None = None,
    window: int | LambdaMask | None = None,
    inv_freq: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        timeout: seconds (positive, finite) a transfer or collective may wait for a peer before
            raising ``CommTimeout``; None: ``RINGRT_P2P_TIMEOUT`` or 300. There is no "no limit"
            value (0 is an error). Applies on gloo; on NCCL waits are stream-ordered and the
            process group's own timeout and watchdog catch a hang.
        return_lse: also return the log-sum-exp of each query row (flash-attn's ``softmax_lse``).
            Ulysses and the hybrid then send it back with the output (4 bytes per head and token).
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
            picks it) or ``"tokenring"`` (queries travel, K/V stay), the others are refused; not with
            ``return_lse``. Under ``torch.compile`` one custom op, like the other algorithms (no graph
            break; a call with a setting refused before the op, such as those above or a bad
            ``timeout``, runs eagerly and raises). The ranks agree on its inputs on every call (the
            Λ ring's own agreement, without the cache below).
        inv_freq: (head_dim/2,) the RoPE frequencies q and k were rotated with, token i of the full
            sequence at position i; needed only by a LambdaMask with n_global > 0 (its global branch
            re-rotates q to min(limit_distance, i) and k to 0), ignored otherwise.
        cu_seqlens: packed documents: a 1-D integer tensor [0, L_0, L_0 + L_1, ..., S] of document
            boundaries in the full packed sequence (flash-attn's ``cu_seqlens``; the same on every
            rank; from positions that restart per document: :func:`ringrt.cu_seqlens_from_positions`).
            No token attends across a boundary, and each block the ranks compute holds only whole
            documents' pieces, so the work scales with sum L_i^2. The shards must be cut per document
            (``ringrt.shard(x, layout=..., cu_seqlens=cu_seqlens)``: every document padded to a multiple
            of 2W, or W for ``"contiguous"``); lengths may be anything under ``causal=True``, and must be
            multiples of 2W (W) otherwise. Every algorithm; not with ``window``. q, k, v may then also be
            3-D (local_tokens, heads, head_dim) (flash-attn's varlen "THD" format): out is 3-D too and lse
            (heads, local_tokens).

    Returns:
        out (batch, local_seq, heads, head_dim): this rank's output shard, dtype of q, differentiable
        w.r.t. q, k, v. Accumulation is in fp32 (fp64 for fp64 inputs). With ``return_lse``,
        (out, lse): lse (batch, heads, local_seq) in fp32 (fp64 for fp64 inputs), the natural-log
        sum-exp of the query row's scaled scores over every key it attended (-inf for a row that
        attended none), differentiable too.

    Raises:
        ValueError on every rank, before any transfer, if any rank's inputs or ``timeout`` are
        invalid, the ranks disagree on shapes, dtypes, settings or whether a backward will follow
        (grad mode and ``requires_grad``), or an NCCL subgroup lacks its dedicated groups.
        ``ringrt.CommTimeout`` / ``ringrt.CommError`` if a peer does not answer in time or its
        connection closes (naming this rank, the peer or collective, the channel and the step).

    The ranks agree on all of that once per signature (shapes, dtypes, settings, backward,
    ``return_lse``), not on every call (Note [agreement cache] in ``ringrt/distributed/agree.py``): a
    rank that alone calls with a new signature or a bad input then waits for the others in vain
    and raises ``CommTimeout``, as they do, instead of a ``ValueError``. ``RINGRT_AGREE_CACHE=0``
    restores an agreement per call.

    Under ``torch.compile`` the work is one custom op (``ringrt/schedules/op.py``), so
    ``fullgraph=True`` traces this function without a graph break; eager calls run the same passes
    without the op's dispatch.
    """
    if window is not None and cu_seqlens is None:
        return _windowed(q, k, v, causal=causal, algorithm=algorithm, layout=layout, softmax_scale=softmax_scale, topology=topology,
                         kernel=kernel, timeout=timeout, group=group, window=window, inv_freq=inv_freq, return_lse=return_lse)
    if layout is None:
        layout = "zigzag" if causal else "contiguous"
    problem = comm.timeout_problem(timeout)  # agreed on like any problem; the agreement then waits the default
    options, extra, thd = (), [], False
    if cu_seqlens is not None:  # packed documents: the schedules over them (ringrt/schedules/documents.py)
        options = (DOCUMENTS,)
        thd = all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v))
        if thd:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if not problem and window is not None:
            problem = f"window={window!r} cannot be used with cu_seqlens; valid: None"
        if not problem and not isinstance(cu_seqlens, torch.Tensor):
            problem = lengths_problem(cu_seqlens)
            cu_seqlens = torch.zeros(2, dtype=torch.int64)  # a placeholder the op's schema takes; the problem stops every rank
        extra = [cu_seqlens]
    call = Call(algorithm=algorithm, causal=causal, layout=layout, softmax_scale=_as_float(softmax_scale), topology=topology,
                kernel=kernel, timeout=None if problem else _as_float(timeout), group=group_name(group),
                backward=needs_backward(q, k, v), return_lse=return_lse, options=options, problem=problem or "")
    if not _encodable(q, k, v, call):
        q, k, v, call = _placeholders(q, k, v, call)
    out, lse = _op.attention(q, k, v, call, extra)
    if thd:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


WINDOW_ALGORITHMS = {"ring": "ring", "tokenring": "tokenring", "auto": "ring"}
"""``algorithm`` with ``window=``: the Λ ring's way of crossing shard boundaries."""


def _windowed(q, k, v, *, causal, algorithm, layout, softmax_scale, topology, kernel, timeout, group, window, inv_freq, return_lse):
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
    if problem is None and return_lse is not False:
        problem = f"return_lse={return_lse!r} cannot be used with window=; valid: False"
    if problem is None and algorithm not in WINDOW_ALGORITHMS:
        problem = (f"algorithm={algorithm!r} cannot be used with window=: windowed attention runs on the Λ ring; "
                   f"valid: {', '.join(map(repr, WINDOW_ALGORITHMS))}")
    if problem is None and _window_encodable(q, k, v, mask, inv_freq, softmax_scale, kernel, timeout):
        # the Λ ring as the custom ops' route (ringrt/lm_infinite/route.py): its own checks and agreement inside
        call = Call(algorithm=_window_route.ROUTE, causal=True, layout="contiguous", softmax_scale=_as_float(softmax_scale),
                    topology="full", kernel=kernel, timeout=_as_float(timeout), group=group_name(group),
                    backward=needs_backward(q, k, v), return_lse=False,
                    options=_window_route.options(mask, WINDOW_ALGORITHMS[algorithm]))
        out, _ = _op.attention(q, k, v, call, [inv_freq] if mask.n_global > 0 else [])
        return out
    # a problem found here, or an argument the op's schema cannot carry: the same checks and agreement, eagerly
    return rotated_lambda_attention(q, k, v, mask=mask, inv_freq=inv_freq, softmax_scale=softmax_scale,
                                    algorithm=WINDOW_ALGORITHMS.get(algorithm, "ring"), kernel=kernel, timeout=timeout,
                                    group=group, problem=problem, what="ringrt.attention")


def _window_encodable(q, k, v, mask: LambdaMask, inv_freq, softmax_scale, kernel, timeout) -> bool:
    """Whether a windowed call can go through the op: every argument of a type its schema carries,
    a valid mask (its fields are the op's ints) and timeout. Everything else is checked in the op."""
    return (
        all(isinstance(t, torch.Tensor) for t in (q, k, v))
        and isinstance(kernel, str)
        and (softmax_scale is None or (isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)))
        and comm.timeout_problem(timeout) is None
        and mask.problem() is None
        and all(abs(x) < 2**62 for x in (mask.n_global, mask.n_local, mask.limit))
        and (mask.n_global == 0 or isinstance(inv_freq, torch.Tensor))
    )


def _as_float(x):
    """A number as a float (as the op's schema wants it); anything else as it is, for the checks."""
    return float(x) if isinstance(x, (int, float)) else x


def _encodable(q, k, v, call: Call) -> bool:
    """Whether every argument has the type the op's schema needs (values are checked in the op)."""
    return (
        all(isinstance(t, torch.Tensor) for t in (q, k, v))
        and all(isinstance(x, str) for x in (call.algorithm, call.layout, call.topology, call.kernel))
        and isinstance(call.causal, bool) and isinstance(call.return_lse, bool)
        and (call.softmax_scale is None or isinstance(call.softmax_scale, float))
    )


def _placeholders(q, k, v, call: Call):
    """Arguments the op's schema accepts, carrying the problem found with the real ones: the op agrees
    on it with the other ranks, so that every rank raises it."""
    problem = call.problem or local_problem(
        q, k, v, causal=call.causal, algorithm=call.algorithm, algorithms=ALGORITHMS, layout=call.layout,
        topology=call.topology, topologies=TOPOLOGIES, softmax_scale=call.softmax_scale, world=by_name(call.group)[2],
    ) or _kernel_problem(call.kernel) or f"return_lse={call.return_lse!r} must be True or False"
    dev = next((t.device for t in (q, k, v) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    q, k, v = (t if isinstance(t, torch.Tensor) else torch.empty(0, device=dev) for t in (q, k, v))
    return q, k, v, Call("", False, "", None, "", "", None, call.group, call.backward, False, call.options, problem)


def _kernel_problem(kernel) -> str | None:
    if isinstance(kernel, str):
        return None
    try:
        get_kernel(torch.device("cpu"), kernel)
    except (ValueError, TypeError) as e:
        return str(e)
    return f"kernel={kernel!r} must be a str"


def shard(x: torch.Tensor, *, layout: str, dim: int = 1, group: dist.ProcessGroup | None = None,
          cu_seqlens: torch.Tensor | None = None, value: float = 0) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` (every rank passes the same full tensor).

    The length of ``dim`` must be a multiple of W (contiguous) or 2W (zigzag); see
    :func:`ringrt.pad_to_multiple`. A DTensor is refused (pass the full tensor, ``x.full_tensor()``).

    With ``cu_seqlens`` (document boundaries of the packed sequence ``x``, as for :func:`attention`)
    each document is cut on its own: padded at its end to a multiple of 2W (W) with ``value`` and
    rank r takes chunks r and 2W-1-r of every document (chunk r), document by document
    (ring-flash-attention's varlen zigzag layout where every length is a multiple of 2W). Positions
    of the shard: :func:`ringrt.positions` with the same ``cu_seqlens``.
    """
    if is_dtensor(x):
        raise ValueError(f"ringrt.shard: x is a DTensor (placements {tuple(x.placements)!r}); pass the full tensor every rank "
                         f"holds (x.full_tensor()), or use x.to_local() of a Shard(1) DTensor directly with layout='contiguous'")
    _, rank, world = base_group(group)
    if cu_seqlens is not None:
        return shard_documents(x, _documents(cu_seqlens, layout, world, "ringrt.shard"), rank, dim, value)
    return _layout.shard_of(x, layout, rank, world, dim)


def _documents(cu_seqlens, layout: str, world: int, what: str) -> Documents:
    _layout.check_layout(layout)
    problem = lengths_problem(cu_seqlens)
    if problem:
        raise ValueError(f"{what}: {problem}")
    return Documents(lengths_of(cu_seqlens), layout, world)


def unshard(x_local: torch.Tensor, *, layout: str, dim: int = 1, group: dist.ProcessGroup | None = None,
            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor from every rank's shard (an all_gather; not differentiable). Waits at most
    ``RINGRT_P2P_TIMEOUT`` (or 300) seconds on gloo; failures raise ``ringrt.CommError``. A DTensor
    is refused (its ``full_tensor()`` is the whole tensor already). With ``cu_seqlens``: the inverse
    of ``shard(..., cu_seqlens=)``, the packed sequence of S tokens, padding dropped."""
    if is_dtensor(x_local):
        raise ValueError(f"ringrt.unshard: x_local is a DTensor (placements {tuple(x_local.placements)!r}); pass this rank's "
                         f"plain shard, or take x_local.full_tensor()")
    _layout.check_layout(layout)
    g, _, world = base_group(group)
    docs = _documents(cu_seqlens, layout, world, "ringrt.unshard") if cu_seqlens is not None else None
    if docs is not None and x_local.shape[dim] != docs.local_len:
        raise ValueError(f"ringrt.unshard: x_local has {x_local.shape[dim]} rows along dim {dim}, the shards of cu_seqlens "
                         f"have {docs.local_len} (layout={layout!r}, world size {world})")
    if world == 1:
        return x_local if docs is None else assemble_documents([x_local], docs, dim)
    parts = [torch.empty_like(x_local) for _ in range(world)]
    local = x_local.contiguous()
    comm.collective("all_gather", lambda: dist.all_gather(parts, local, group=g, async_op=True), group=g,
                    device=local.device, timeout_s=None, channel="unshard")
    return _layout.assemble(parts, layout, dim) if docs is None else assemble_documents(parts, docs, dim)


def positions(layout: str, rank: int, world: int, local_len: int, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (int64, (local_len,)) of the tokens ``rank`` holds: their global indices, or with
    ``cu_seqlens`` their positions within their documents (restarting at 0 in each; padding continues
    its document), as ``shard(..., cu_seqlens=)`` cut them. RoPE takes these."""
    if cu_seqlens is None:
        return _layout.positions(layout, rank, world, local_len)
    docs = _documents(cu_seqlens, layout, world, "ringrt.positions")
    if local_len != docs.local_len:
        raise ValueError(f"ringrt.positions: local_len={local_len}, but the shards of cu_seqlens have {docs.local_len} rows "
                         f"(layout={layout!r}, world size {world})")
    return docs.local_positions(rank).clone()
