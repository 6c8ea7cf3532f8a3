"""Public entry points: ``lambda_attention`` and ``sliding_window_attention``."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..distributed import comm
from ..distributed.agree import DTYPES, agree_fields, local_problem, needs_backward, show_field
from ..distributed.groups import base_group, nccl_problem, ring_groups
from ..ops.kernels import get_kernel
from ..ops.rope import apply_rope, inv_freq
from ..schedules.base import swapped
from .mask import LambdaMask, sliding_window, stationary_positions
from .plan import halo_plan
from .ring import LambdaPlan, lambda_backward, lambda_forward

ALGORITHMS = ("ring", "tokenring")
DEFAULT_BLOCK = 512


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (*positions.shape, head_dim) for the Hugging Face Llama RoPE.

    Angles are computed in fp32 as Hugging Face does, or in fp64 for fp64 inputs (so that an fp64
    reference check is not limited by fp32 angles at large positions).
    """
    return freq_cos_sin(positions, inv_freq(head_dim, theta, positions.device), dtype)


def freq_cos_sin(positions: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (*positions.shape, head_dim) for rotations by ``positions`` (any sign) at the
    frequencies ``freqs`` (head_dim/2,), in fp32 as Hugging Face computes them (fp64 for fp64)."""
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    angles = positions.to(adt).unsqueeze(-1) * freqs.to(adt)  # (..., D/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: LambdaMask,
    rope_theta: float = 10000.0,
    softmax_scale: float | None = None,
    algorithm: str = "ring",
    position_offset: int = 0,
    block_size: int | None = None,
    kernel: str = "auto",
    timeout: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """LM-Infinite Λ-mask attention over a sequence cut into contiguous shards across ``group``.

    Query i attends to keys i - n_local < j <= i with normal RoPE (local branch) and to the first
    n_global keys further back (global branch: key not rotated, query rotated to
    min(limit_distance, i), so a far global key sits at distance limit_distance); one softmax over
    both. n_global = 2, n_local = 3 (1 = attended)::

        1 . . . . . .
        1 1 . . . . .
        1 1 1 . . . .
        1 1 1 1 . . .        rows: queries 0..6
        1 1 1 1 1 . .        columns: keys 0..6
        1 1 . 1 1 1 .
        1 1 . . 1 1 1

    Each rank computes only its non-empty blocks (local tiles of ``block_size`` rows; dense ones
    without a mask), receives only the halo K/V its window reaches from its predecessors (at most
    n_local - 1 tokens) and the n_global global tokens through a relay, so time grows linearly with
    the sequence and bytes per rank do not grow with the sequence or the number of ranks. With one
    process this is exactly LM-Infinite's attention (see ``mask.py`` for the one deliberate choice
    when limit_distance > n_local).

    Args:
        q: (batch, local_seq, heads, head_dim) pre-RoPE queries: this rank's contiguous shard
            (rank r holds tokens r*local_seq .. (r+1)*local_seq - 1; see ``ringrt.shard(...,
            layout="contiguous")``).
        k, v: (batch, local_seq, kv_heads, head_dim), k pre-RoPE; heads a multiple of kv_heads.
        mask: a :class:`ringrt.LambdaMask`.
        rope_theta: RoPE base (Hugging Face Llama ``rope_theta``), rotate_half convention.
        softmax_scale: default 1/sqrt(head_dim).
        algorithm: how the local window crosses shard boundaries (the global tokens always ride a
            K/V relay). ``"ring"``: the halo K/V (at most n_local - 1 tokens) travel to the queries'
            rank, their gradients back (the KV-ring way). ``"tokenring"``: the queries that need a
            predecessor's keys travel to it and the partial (out, lse) comes back, K/V and dK/dV
            never move (the TokenRing way). Both move the same number of tokens; per token "ring"
            moves 2 x kv_heads x head_dim values and "tokenring" about 2 x heads x head_dim, so
            "ring" is the cheaper one under GQA and the two tie for multi-head attention.
        position_offset: RoPE position of token 0 (token i is at position_offset + i). The mask,
            the global tokens and the cap are defined on token indices, so the output does not
            depend on it (up to rounding): only relative positions enter the local branch.
        block_size: query rows per kernel call; default min(local_seq, 512).
        kernel: local block kernel, ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"math"``.
        timeout: seconds (positive, finite) a transfer may wait for a peer before raising
            ``CommTimeout``; None: ``RINGRT_P2P_TIMEOUT`` or 300; 0 is an error, not "no limit"
            (gloo; on NCCL waits are stream-ordered and the process group's timeout and watchdog apply).
        group: process group the sequence is sharded over (default: the default group; none
            initialised or one rank: single-process attention), or a 1-D ``DeviceMesh`` (a slice
            ``mesh["sp"]``) meaning its process group, as in :func:`ringrt.attention`. A subgroup on
            NCCL needs its dedicated lanes (``ringrt.distributed.groups.new_subgroups``).

    Returns:
        (batch, local_seq, heads, head_dim): this rank's output shard, dtype of q, differentiable
        w.r.t. q, k, v. Accumulation in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError on every rank, before any transfer, if any rank's inputs, settings or
        ``timeout`` are invalid or the ranks disagree (whether a backward will follow included).
        ``ringrt.CommTimeout`` / ``ringrt.CommError`` if a peer does not answer in time or its
        connection closes.
    """
    check = lambda: _settings_problem(q, mask, rope_theta, algorithm, position_offset, block_size)  # noqa: E731
    extra = [("rope_theta", rope_theta), ("position_offset", position_offset)]

    def rotate(index: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        d = q.shape[-1]
        cos, sin = rope_cos_sin(index + position_offset, d, rope_theta, q.dtype)  # (S, D)
        cos_s, sin_s = rope_cos_sin(stationary_positions(index, mask), d, rope_theta, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(q, cos_s, sin_s), apply_rope(k, cos, sin), k

    return _run(q, k, v, mask=mask, rotate=rotate, checks=(check,), extra=extra, softmax_scale=softmax_scale, algorithm=algorithm,
                block_size=block_size, kernel=kernel, timeout=timeout, group=group, what="ringrt.lambda_attention")


def rotated_lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: LambdaMask,
    inv_freq: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    algorithm: str = "ring",
    block_size: int | None = None,
    kernel: str = "auto",
    timeout: float | None = None,
    group: dist.ProcessGroup | None = None,
    problem: str | None = None,
    what: str = "ringrt.attention",
) -> torch.Tensor:
    """:func:`lambda_attention` on q and k already rotated (post-RoPE), as a Hugging Face model has them.

    Token i of the full sequence must have been rotated at position i (contiguous shards: rank r's
    row j is token r * local_seq + j). The local branch and a sliding window (``n_global = 0``) use q
    and k as given, whatever rotation they carry. The global branch needs q at min(limit_distance, i)
    and k unrotated: it rotates q and k back by i with ``inv_freq`` (head_dim/2,), the RoPE
    frequencies they were rotated with (Hugging Face: ``model.model.rotary_emb.inv_freq``, rope
    scaling such as ``llama3`` included), then q forward to min(limit_distance, i). ``inv_freq`` is
    required when ``mask.n_global > 0`` and ignored otherwise. ``problem``: a problem the caller found
    in its own settings, agreed on with the ranks like any other (``what`` names the caller).
    Shapes, other arguments, returns and raises as in :func:`lambda_attention`.
    """
    checks = (lambda: problem, lambda: _settings_problem(q, mask, 10000.0, algorithm, 0, block_size), lambda: _inv_freq_problem(q, mask, inv_freq))
    needs_freq = isinstance(mask, LambdaMask) and mask.n_global > 0
    extra = [("inv_freq", 1 if needs_freq else 0)]

    def rotate(index: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if not needs_freq:
            return q, q, k, k  # the global branch is empty: qs and the raw k are never read
        qs, k_raw = global_inputs(q, k, rotation_tables(index, mask, inv_freq, q.dtype))
        return q, qs, k, k_raw

    return _run(q, k, v, mask=mask, rotate=rotate, checks=checks, extra=extra, softmax_scale=softmax_scale, algorithm=algorithm,
                block_size=block_size, kernel=kernel, timeout=timeout, group=group, what=what)


def rotation_tables(index: torch.Tensor, mask: LambdaMask, freqs: torch.Tensor, dtype: torch.dtype):
    """((cos, sin) by -i, (cos, sin) by min(limit_distance, i)) for the token indices ``index``: the
    rotations that take q and k rotated at i to the global branch's (see :func:`global_inputs`)."""
    back = freq_cos_sin(-index, freqs, dtype)  # rotate by -i: undo the caller's rotation
    return back, freq_cos_sin(stationary_positions(index, mask), freqs, dtype)


def global_inputs(q: torch.Tensor, k: torch.Tensor, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """(qs, k raw) of the global branch from q and k rotated at their positions (``tables``: of
    :func:`rotation_tables`): q rotated back to 0 then to min(limit_distance, i), k back to 0."""
    back, stat = tables
    q_raw, k_raw = apply_rope(q, *back), apply_rope(k, *back)
    return apply_rope(q_raw, *stat), k_raw


def global_grads(dqs: torch.Tensor, dkraw: torch.Tensor, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients w.r.t. q and k of :func:`global_inputs` given those of qs and k raw: each
    rotation transposed, which is the rotation by the opposite angle (the same cos, -sin)."""
    back, stat = tables
    dq_raw = apply_rope(dqs, stat[0], -stat[1])
    return apply_rope(dq_raw, back[0], -back[1]), apply_rope(dkraw, back[0], -back[1])


def _run(q, k, v, *, mask, rotate, checks, extra, softmax_scale, algorithm, block_size, kernel, timeout, group, what):
    """Validate and agree (every rank raises the same ValueError), then run the Λ ring on the
    tensors ``rotate(token indices of this shard, q, k)`` returns: (q local, q global, k local, k
    global); see :class:`_LambdaRing` for what the backward keeps.
    ``checks``: the caller's own checks (each returns a problem or None), run in order once the
    common input checks pass."""
    base, rank, world = base_group(group)
    t_problem = comm.timeout_problem(timeout)  # agreed on like any problem; the agreement then waits the default
    to = comm.resolve_timeout(None if t_problem else timeout)
    plan = checked_plan(q, k, v, base=base, rank=rank, world=world, problem=t_problem, timeout=to, mask=mask, checks=checks,
                        extra=extra, softmax_scale=softmax_scale, algorithm=algorithm, block_size=block_size, kernel=kernel,
                        requires_grad=needs_backward(q, k, v), what=what)
    s = q.shape[1]
    index = torch.arange(plan.groups.rank * s, (plan.groups.rank + 1) * s, device=q.device)  # token indices of this shard
    return _LambdaRing.apply(plan, rotate, index, q, k, v)


class _LambdaRing(torch.autograd.Function):
    """The eager Λ ring with RoPE inside: saves only q, k, v (as given), out and lse (and the few
    received halo and global keys and values), not the rotated copies.

    Note [Λ-mask saved tensors]: the four rotated inputs of the ring (q local, q global, k local, k
    global; 2 x heads + 2 x kv_heads values per token) and their heads-first copies are made in the
    forward and dropped at once; the backward makes them again from q and k (a few elementwise ops)
    and pulls their gradients back through the same rotation with autograd (exact: the same ops).
    ``out`` is saved in the layout it is returned in, so the caller's ``o_proj`` and this Function
    share one copy. Per token and layer the backward keeps (2 heads + 2 kv_heads) x head_dim values
    + heads lse values: 1.5 KiB in fp32 for the demo model (4 heads, 2 kv heads, head_dim 32), down
    from 3.3 KiB (heads-first copies of the five ring inputs, the RoPE tables of their rotation, out
    twice). The backward's own working set is counted in Note [activation memory]
    (``ringrt/model/memory.py``).
    """

    @staticmethod
    def forward(ctx, plan: LambdaPlan, rotate, index, q, k, v):
        rotated = _rotate_heads_first(rotate, index, swapped(q), swapped(k))
        out, lse, *kept = lambda_forward(*rotated[:2], *rotated[2:], swapped(v), plan)
        del rotated
        out = swapped(out)  # (B, S, H, D) contiguous: the caller's view of it is what it keeps
        ctx.save_for_backward(q, k, v, out, lse, *kept)
        ctx.plan, ctx.rotate, ctx.index = plan, rotate, index
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, *kept = ctx.saved_tensors
        with torch.enable_grad():
            qd, kd = swapped(q).requires_grad_(), swapped(k).requires_grad_()  # (B, H|H_kv, S, D) leaves
            rotated = _rotate_heads_first(ctx.rotate, ctx.index, qd, kd)  # (qr, qs, kr, kraw) heads-first
            grads = lambda_backward(swapped(dout), *(x.detach() for x in rotated), swapped(v), out.transpose(1, 2), lse, *kept, ctx.plan)
            dq, dk = torch.autograd.grad(rotated, (qd, kd), grads[:4])
        return None, None, None, dq.transpose(1, 2), dk.transpose(1, 2), grads[4].transpose(1, 2)


def _rotate_heads_first(rotate, index, q, k) -> list[torch.Tensor]:
    """``rotate`` (written for (B, S, H, D)) on heads-first q, k (B, H, S, D): it runs on transposed
    views, so its elementwise results keep the heads-first memory order and come back as contiguous
    (B, H, S, D) tensors without a copy."""
    return [x.transpose(1, 2).contiguous() for x in rotate(index, q.transpose(1, 2), k.transpose(1, 2))]


def checked_plan(q, k, v, *, base, rank: int, world: int, problem: str | None, timeout: float, mask, checks, extra, softmax_scale,
                 algorithm, block_size, kernel, requires_grad: bool, what: str) -> LambdaPlan:
    """The plan of a Λ-ring call on ``base`` (rank of world), after every rank agreed that every
    rank's inputs are valid and alike (else the same ValueError on every rank). ``problem``: found
    by the caller first (its timeout), ``checks`` as in :func:`_run`; ``requires_grad``: whether a
    backward follows."""
    problem = problem or local_problem(
        q, k, v, causal=True, algorithm="ring", algorithms=ALGORITHMS, layout="contiguous",
        topology="full", topologies=("full",), softmax_scale=softmax_scale, world=world,
    )
    for check in checks:
        problem = problem or check()
    kern = None
    if problem is None:
        try:
            kern = get_kernel(q.device, kernel)
            problem = nccl_problem(base, q.device)  # an NCCL subgroup needs its dedicated lanes
        except ValueError as e:
            problem = str(e)
    ok = problem is None
    fields = [
        ("batch", q.shape[0] if ok else -1), ("local_seq", q.shape[1] if ok else -1), ("heads", q.shape[2] if ok else -1),
        ("kv_heads", k.shape[2] if ok else -1), ("head_dim", q.shape[3] if ok else -1),
        ("dtype", DTYPES.index(q.dtype) if ok else -1),
        ("n_global", mask.n_global if ok else -1), ("n_local", mask.n_local if ok else -1), ("limit_distance", mask.limit if ok else -1),
        *((name, val if ok else -1) for name, val in extra),
        ("softmax_scale", softmax_scale if ok and softmax_scale is not None else -1),
        ("algorithm", ALGORITHMS.index(algorithm) if ok else -1),
        ("block_size", block_size if ok and block_size is not None else -1),
        ("requires_grad", requires_grad if ok else -1),
    ]
    agree_fields(base, rank, world, problem, fields, what, timeout, q.device if isinstance(q, torch.Tensor) else None, show=show_field)
    # after the agreement: creating groups needs every rank present (a bounded rendezvous first)
    groups = ring_groups(base, timeout_s=timeout, device=q.device)
    return lambda_plan(q, groups, mask, kern, softmax_scale, algorithm, block_size, timeout)


def lambda_plan(q, groups, mask: LambdaMask, kern, softmax_scale, algorithm: str, block_size, timeout: float) -> LambdaPlan:
    """The :class:`LambdaPlan` of valid inputs (no checks, no communication)."""
    s, d = q.shape[1], q.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    return LambdaPlan(
        mask=mask, scale=float(scale), kernel=kern, groups=groups, halo=halo_plan(groups.rank, groups.world, s, mask),
        block=min(s, block_size or DEFAULT_BLOCK), algorithm=algorithm, timeout=timeout,
    )


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, group: dist.ProcessGroup | None = None, **kwargs
) -> torch.Tensor:
    """Causal sliding-window attention (query i sees keys i - window + 1 .. i) on contiguous shards.

    ``lambda_attention`` with ``mask=sliding_window(window)``; q, k, v pre-RoPE, same shapes and
    keyword arguments (``rope_theta``, ``softmax_scale``, ...).
    """
    return lambda_attention(q, k, v, mask=sliding_window(window), group=group, **kwargs)


def _inv_freq_problem(q, mask: LambdaMask, inv_freq) -> str | None:
    if mask.n_global == 0:
        return None
    if not isinstance(inv_freq, torch.Tensor):
        return (f"inv_freq={inv_freq!r}: a LambdaMask with n_global={mask.n_global} on rotated q/k needs the RoPE frequencies "
                f"(a tensor of head_dim/2 = {q.shape[3] // 2} values, e.g. model.model.rotary_emb.inv_freq) to re-rotate the global branch")
    if inv_freq.shape != (q.shape[3] // 2,) or not inv_freq.is_floating_point():
        return f"inv_freq must be a float tensor of shape ({q.shape[3] // 2},) (head_dim/2), got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    if inv_freq.device != q.device:
        return f"inv_freq is on {inv_freq.device} but q is on {q.device}; move it to q's device"
    return None


def _settings_problem(q, mask, rope_theta, algorithm, position_offset, block_size) -> str | None:
    if not isinstance(mask, LambdaMask):
        return f"mask must be a ringrt.LambdaMask, got {type(mask).__name__}"
    p = mask.problem()
    if p:
        return p
    if algorithm not in ALGORITHMS:
        return f"algorithm={algorithm!r} is not a known Λ-mask algorithm; valid: {', '.join(ALGORITHMS)}"
    if q.shape[3] % 2:
        return f"head_dim={q.shape[3]} must be even for rotary embeddings (rope_theta)"
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not math.isfinite(rope_theta) or rope_theta <= 0:
        return f"rope_theta={rope_theta!r} must be a positive finite number (Hugging Face Llama: 10000.0 or 500000.0)"
    if isinstance(position_offset, bool) or not isinstance(position_offset, int) or position_offset < 0:
        return f"position_offset={position_offset!r} must be an int >= 0"
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        return f"block_size={block_size!r} must be a positive int or None (default {DEFAULT_BLOCK})"
    return None
