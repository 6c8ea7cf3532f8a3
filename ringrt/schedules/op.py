"""``ringrt.attention`` as two custom ops, so that ``torch.compile`` sees one opaque call::

    ringrt::attention_fwd(q, k, v, extra, *settings) -> (out, lse, kept)
    ringrt::attention_bwd(dout, dlse, q, k, v, extra, out, lse, kept, *settings) -> (dq, dk, dv)

Everything that communicates or decides on the host runs inside them: the checks and the agreement
(``call.setup``), group creation, the schedule's transfers and collectives, ``auto``'s choice. A
traced graph holds one node per call and never breaks on them. ``register_fake`` gives the outputs'
exact shapes and dtypes from the inputs' (``Pass.kept``; the one size a trace cannot know, ``auto``'s
packed buffer, is a run-time size, which dynamo captures with ``fullgraph=True``),
``register_autograd`` ties the two ops together: the backward gets q, k, v, out, lse and the kept
tensors, and the gradient of lse when ``return_lse``.

Eager calls run the same two functions (:func:`run_forward`, :func:`run_backward`) under a plain
autograd Function instead: the custom op's dispatch and its Python autograd wrapper cost about
0.3 ms more per forward + backward on CPU (measured on one process, (1, 8, 2, 8) fp32: 690 us through
the op, 410 us without; 310 us against 55 us for an op that does nothing), which buys nothing
outside a trace.

The settings are the ops' arguments after the tensors, as :class:`call.Call` lists them: str, float,
int, bool, and two lists for settings a route may add without a new schema: ``extra`` (further
input tensors, no gradient) and ``options`` (ints). The schedules here take neither; a route
(``routes.py``: a whole call registered by a package above this one, the Λ-mask of ``window=``) may.

Outputs are contiguous and never alias an input or each other (a custom op must not return views).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed.groups import by_name
from ..ops.merge import acc_dtype
from . import ALGORITHMS, documents
from .call import Call, backward_plan, setup
from .routes import ROUTES


def attention(q: Tensor, k: Tensor, v: Tensor, call: Call, extra: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(out (B, S_l, H, D), lse (B, H, S_l)) of one call; lse holds NaN unless ``call.return_lse`` (a
    schedule that would have to move it does not). The custom op under ``torch.compile``, else the
    same passes under :class:`_EagerAttention`."""
    extra = extra or []
    if torch.compiler.is_compiling():
        out, lse, _ = attention_fwd(q, k, v, extra, *call.args())
        return out, lse
    return _EagerAttention.apply(call, extra, q, k, v)


def run_forward(q: Tensor, k: Tensor, v: Tensor, extra: list[Tensor], call: Call) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, lse, kept) of one call, after the checks and the agreement."""
    route = ROUTES.get(call.algorithm)
    if route is not None:  # a whole call of its own: checks, agreement and pass
        out, lse, kept = route.forward(q, k, v, list(extra), call)
    else:
        plan = setup(q, k, v, call, extra)
        out, lse, kept = documents.run(ALGORITHMS[call.algorithm], q, k, v, plan)
    if lse is None:
        lse = torch.full(_lse_shape(q), float("nan"), dtype=acc_dtype(q.dtype), device=q.device)
    out, lse, *kept = _owned([out, lse, *kept], [q, k, v, *extra])
    return out, lse, kept


def run_backward(dout: Tensor | None, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, extra: list[Tensor], out: Tensor,
                 lse: Tensor, kept: list[Tensor], call: Call) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of a call whose forward :func:`run_forward` ran; dout None: out got no gradient,
    dlse None: lse got none (ignored unless ``call.return_lse``)."""
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = dlse.contiguous() if dlse is not None and call.return_lse else None
    route = ROUTES.get(call.algorithm)
    if route is not None:
        grads = route.backward(dout, dlse, q, k, v, list(extra), out, lse, list(kept), call)
    else:
        grads = documents.run_backward(ALGORITHMS[call.algorithm], dout, q, k, v, out, lse, list(kept),
                                       backward_plan(q, call, dlse, extra))
    dq, dk, dv = _owned(list(grads), [dout, q, k, v, out, lse, *extra, *kept, *([dlse] if dlse is not None else [])])
    return dq, dk, dv


class _EagerAttention(torch.autograd.Function):
    """The eager path: :func:`run_forward` / :func:`run_backward` as an autograd Function."""

    @staticmethod
    def forward(ctx, call: Call, extra: list[Tensor], q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out, lse, kept = run_forward(q, k, v, extra, call)
        ctx.save_for_backward(q, k, v, out, lse, *extra, *kept)
        ctx.call, ctx.n_extra = call, len(extra)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        extra, kept = rest[: ctx.n_extra], rest[ctx.n_extra :]
        return (None, None, *run_backward(dout, dlse, q, k, v, extra, out, lse, kept, ctx.call))


@torch.library.custom_op("ringrt::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, extra: list[Tensor], algorithm: str, causal: bool, layout: str,
    softmax_scale: float | None, topology: str, kernel: str, timeout: float | None, group: str, backward: bool,
    return_lse: bool, options: list[int], problem: str,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    call = Call.of(algorithm, causal, layout, softmax_scale, topology, kernel, timeout, group, backward, return_lse,
                   options, problem)
    return run_forward(q, k, v, list(extra), call)


@attention_fwd.register_fake
def _fake_forward(q, k, v, extra, algorithm, causal, layout, softmax_scale, topology, kernel, timeout, group, backward,
                  return_lse, options, problem):
    """Outputs of the real op's shapes and dtypes (nothing kept where the real op will raise)."""
    kept = []
    if not problem and q.dim() == 4 and k.dim() == 4 and (algorithm in ALGORITHMS or algorithm in ROUTES):
        try:
            _, rank, world = by_name(group)
            specs = (ROUTES[algorithm] if algorithm in ROUTES else ALGORITHMS[algorithm]).kept(q, k, rank, world, tuple(options))
        except ValueError:  # a setting the real op rejects on every rank
            specs = []
        ctx = torch.library.get_ctx()
        kept = [q.new_empty(tuple(ctx.new_dynamic_size() if n is None else n for n in shape), dtype=dt) for shape, dt in specs]
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=acc_dtype(q.dtype)), kept


@torch.library.custom_op("ringrt::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, extra: list[Tensor], out: Tensor, lse: Tensor,
    kept: list[Tensor], algorithm: str, causal: bool, layout: str, softmax_scale: float | None, topology: str, kernel: str,
    timeout: float | None, group: str, backward: bool, return_lse: bool, options: list[int], problem: str,
) -> tuple[Tensor, Tensor, Tensor]:
    call = Call.of(algorithm, causal, layout, softmax_scale, topology, kernel, timeout, group, backward, return_lse,
                   options, problem)
    return run_backward(dout, dlse, q, k, v, list(extra), out, lse, list(kept), call)


@attention_bwd.register_fake
def _fake_backward(dout, dlse, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, extra, *settings = inputs
    out, lse, kept = output
    ctx.save_for_backward(q, k, v, out, lse, *extra, *kept)
    ctx.n_extra, ctx.settings = len(extra), settings


def _backward(ctx, dout, dlse, dkept):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    extra, kept = rest[: ctx.n_extra], rest[ctx.n_extra :]
    dout = torch.zeros_like(out) if dout is None else dout  # None: only lse was used
    dq, dk, dv = attention_bwd(dout, dlse, q, k, v, extra, out, lse, kept, *ctx.settings)
    # one None per input that gets no gradient, in the inputs' structure as torch flattens it: a list of
    # tensors (an empty list included) is a list, any other list (options' ints) is one leaf
    return dq, dk, dv, [None] * ctx.n_extra, *([] if isinstance(x, list) and not x else None for x in ctx.settings)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _lse_shape(q: Tensor) -> tuple[int, ...]:
    """(B, H, S_l) of q (B, S_l, H, D); (0,) for a q the checks reject."""
    return (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (0,)


def _owned(outs: list[Tensor], ins: list[Tensor]) -> list[Tensor]:
    """``outs`` made contiguous, each cloned where it shares memory with an input or an earlier output
    (an empty one replaced by a fresh empty tensor: a view of no elements still shares a storage)."""
    seen = {t.untyped_storage().data_ptr() for t in ins if t.numel()}
    owned = []
    for t in outs:
        t = t.contiguous()
        if not t.numel():
            t = t.new_empty(t.shape)
        else:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        owned.append(t)
    return owned
