"""``ringrt.attention(..., window=...)`` inside the custom ops ``ringrt::attention_fwd`` / ``_bwd``.

Registered at import as the route :data:`ROUTE` (``ringrt.schedules.routes``), so that a windowed
call, like every other ``ringrt.attention`` call, is one opaque node under ``torch.compile``. The
call's settings (:func:`options`): n_global, n_local, whether limit_distance is set and its value,
the Λ ring's algorithm (index into ``attention.ALGORITHMS``); ``extra``: [inv_freq] when
n_global > 0, else nothing. ``Call.problem``, ``softmax_scale``, ``kernel``, ``timeout``, ``group``
and ``backward`` (the agreement's ``requires_grad``) as for the schedules.

Forward: the Λ ring's own checks and agreement (:func:`attention.checked_plan`, the messages and
``what="ringrt.attention"`` of :func:`attention.rotated_lambda_attention`; an agreement on every
call, not the schedules' cache: see Note [agreement cache] in ``ringrt/distributed/agree.py``),
then the rotation to the global branch's qs and raw k (plain torch ops, inside the op) and the raw
Λ-ring forward; kept: the halo K and V and the global K and V it received (heads-first, shapes from
``plan.halo_plan``). Backward: the same rotation recomputed, the raw Λ-ring backward, and the
gradients of qs and raw k rotated back (:func:`attention.global_grads`) and added to dq and dk.

A call ``ringrt.attention`` finds wrong before the op (or cannot encode) runs
:func:`attention.rotated_lambda_attention` eagerly instead; its agreement is the same all_gather of
the same fields on the same group, so a rank there and a rank in the op still raise the same error.
"""

from __future__ import annotations

import torch

from ..distributed import comm
from ..distributed.groups import by_name, ring_groups
from ..ops.kernels import get_kernel
from ..schedules.base import swapped
from ..schedules.call import Call
from ..schedules.routes import Route, register
from .attention import (
    ALGORITHMS, _inv_freq_problem, _settings_problem, checked_plan, global_grads, global_inputs, lambda_plan, rotation_tables,
)
from .mask import LambdaMask
from .plan import halo_plan
from .ring import lambda_backward, lambda_forward

ROUTE = "lambda"
"""``Call.algorithm`` of a windowed call (never an ``algorithm=`` of a caller)."""


def options(mask: LambdaMask, algorithm: str) -> tuple[int, ...]:
    """The op's integer settings of a valid ``mask`` and Λ-ring ``algorithm``."""
    limit = mask.limit_distance
    return (mask.n_global, mask.n_local, int(limit is not None), 0 if limit is None else limit, ALGORITHMS.index(algorithm))


def _settings(opts) -> tuple[LambdaMask, str]:
    n_global, n_local, has_limit, limit, algo = opts
    return LambdaMask(n_global=n_global, n_local=n_local, limit_distance=limit if has_limit else None), ALGORITHMS[algo]


def _global_branch(q, k, mask: LambdaMask, inv_freq, rank: int):
    """(qs, k raw, rotation tables) of this shard; (q, k, None) when the global branch is empty."""
    if mask.n_global == 0:
        return q, k, None
    s = q.shape[1]
    index = torch.arange(rank * s, (rank + 1) * s, device=q.device)  # token indices of this shard
    tables = rotation_tables(index, mask, inv_freq, q.dtype)
    return (*global_inputs(q, k, tables), tables)


def _forward(q, k, v, extra, call: Call):
    mask, algorithm = _settings(call.options)
    inv_freq = extra[0] if extra else None
    base, rank, world = by_name(call.group)
    checks = (lambda: _settings_problem(q, mask, 10000.0, algorithm, 0, None), lambda: _inv_freq_problem(q, mask, inv_freq))
    plan = checked_plan(q, k, v, base=base, rank=rank, world=world, problem=call.problem or None,
                        timeout=comm.resolve_timeout(call.timeout), mask=mask, checks=checks,
                        extra=[("inv_freq", 1 if mask.n_global > 0 else 0)], softmax_scale=call.softmax_scale,
                        algorithm=algorithm, block_size=None, kernel=call.kernel, requires_grad=call.backward,
                        what="ringrt.attention")
    qs, kraw, _ = _global_branch(q, k, mask, inv_freq, plan.groups.rank)
    out, lse, *kept = lambda_forward(*(swapped(x) for x in (q, qs, k, kraw, v)), plan)
    return swapped(out), lse, list(kept)


def _backward(dout, dlse, q, k, v, extra, out, lse, kept, call: Call):
    mask, algorithm = _settings(call.options)
    inv_freq = extra[0] if extra else None
    base, _, _ = by_name(call.group)
    to = comm.resolve_timeout(call.timeout)
    groups = ring_groups(base, timeout_s=to, device=q.device)  # made by the forward: no communication
    plan = lambda_plan(q, groups, mask, get_kernel(q.device, call.kernel), call.softmax_scale, algorithm, None, to)
    qs, kraw, tables = _global_branch(q, k, mask, inv_freq, groups.rank)
    grads = lambda_backward(*(swapped(x) for x in (dout, q, qs, k, kraw, v, out)), lse, *kept, plan)
    dqr, dqs, dkr, dkraw, dv = (swapped(g) for g in grads)
    if tables is None:  # qs is q and the raw k is k
        return dqr + dqs, dkr + dkraw, dv
    dq_g, dk_g = global_grads(dqs, dkraw, tables)
    return dqr + dq_g, dkr + dk_g, dv


def _kept(q, k, rank: int, world: int, opts) -> list:
    """(shape, dtype) of the halo K, V and the global K, V the forward keeps; [] for settings it rejects."""
    try:
        mask, algorithm = _settings(tuple(opts))
    except (ValueError, IndexError):
        return []
    if mask.problem() or q.shape[1] < 1:
        return []
    hp = halo_plan(rank, world, q.shape[1], mask)
    b, h_kv, d = k.shape[0], k.shape[2], k.shape[3]
    n_halo = sum(r.n for r in hp.halo_from) if algorithm == "ring" else 0
    return [((b, h_kv, n, d), k.dtype) for n in (n_halo, n_halo, hp.global_held, hp.global_held)]


register(ROUTE, Route(forward=_forward, backward=_backward, kept=_kept))
