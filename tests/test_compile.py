"""``ringrt.attention`` as one custom op: ``torch.compile(fullgraph=True)`` traces it without a graph
break and gives eager's outputs and gradients (one process and two gloo ranks); the ranks agree on
a call's inputs once per signature; ``return_lse`` gives the lse and its gradient, against an fp64
single-process reference at W = 1, 2 and 4 for every algorithm, causal and not; ``window=`` (a sliding
window, a Λ-mask with ``inv_freq``) is the same op, without a graph break either."""

from __future__ import annotations

import math

import pytest
import torch

import ringrt
from ringrt.schedules import call as attention_call
from ringrt.schedules import op as attention_op
from tests.distributed import run
from tests.fault_util import caught, run_faulty
from tests.reference import reference_attention


def _qkv(seed: int, s: int = 8, heads: int = 4, kv_heads: int = 2, d: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, s, h, d, generator=g, dtype=torch.float64).to(dtype) for h in (heads, kv_heads, kv_heads, heads)]


def _graphs(fn, *args, run_time_sizes: bool = False) -> tuple[int, int]:
    """(graphs, graph breaks) of ``fn(*args)`` under dynamo (``torch._dynamo.explain``, which does not
    trace full-graph: ``run_time_sizes`` lets it capture an op whose output size only the run knows,
    as ``fullgraph=True`` does)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=run_time_sizes):
        e = torch._dynamo.explain(fn)(*args)
    return e.graph_count, e.graph_break_count


def _fullgraph_graphs(fn, *args) -> int:
    """How many graphs ``torch.compile(fn, fullgraph=True)`` hands its backend."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return len(seen)


def _step(fn, q, k, v, do, dl):
    """fn's outputs and the gradients of sum(out * do) (+ sum(lse * dl)) w.r.t. q, k, v."""
    qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
    got = fn(qq, kk, vv)
    out, lse = got if isinstance(got, tuple) else (got, None)
    ((out * do).sum() + (0 if lse is None else (lse * dl).sum())).backward()
    return [out.detach(), *([] if lse is None else [lse.detach()]), qq.grad, kk.grad, vv.grad]


def _compile_cases(world: int, backend: str = "aot_eager", algorithms=tuple(ringrt.ALGORITHMS), lse=(True, False)) -> dict:
    """Per algorithm and return_lse: (graphs, breaks) under explain, graphs under fullgraph=True, and
    the largest difference between a fullgraph-compiled step and the eager one (outputs, gradients)."""
    res = {}
    for algo in algorithms:
        for return_lse in lse:
            q, k, v, do = (ringrt.shard(x, layout="zigzag") for x in _qkv(0, s=8 * world))
            dl = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=torch.Generator().manual_seed(1))

            def f(q, k, v, algo=algo, return_lse=return_lse):
                return ringrt.attention(q, k, v, causal=True, algorithm=algo, return_lse=return_lse, timeout=60)

            explained = _graphs(f, q, k, v, run_time_sizes=algo == "auto")  # auto's kept buffer: a run-time size
            full = _fullgraph_graphs(f, q, k, v)
            torch._dynamo.reset()
            eager = _step(f, q, k, v, do, dl)
            compiled = _step(torch.compile(f, fullgraph=True, backend=backend), q, k, v, do, dl)
            res[(algo, return_lse)] = (explained, full,
                                       max((a - b).abs().max().item() for a, b in zip(eager, compiled, strict=True)))
    return res


def _check_compiled(res: dict) -> None:
    for algo, (explained, full, diff) in res.items():
        assert explained == (1, 0), (algo, explained)
        assert full == 1, (algo, full)
        assert diff == 0.0, (algo, diff)  # the compiled op and the eager path run the same passes on the same inputs


def test_fullgraph_compile_without_graph_breaks_on_one_process():
    _check_compiled(_compile_cases(1))


def test_inductor_compiles_the_op_with_its_backward():
    _check_compiled(_compile_cases(1, backend="inductor", algorithms=("tokenring",), lse=(True,)))


def _compile_worker(rank, world):
    return _compile_cases(world), _window_cases(world)


@pytest.mark.timeout(300)
def test_fullgraph_compile_without_graph_breaks_on_two_ranks():
    """Every schedule, and window= (the Λ route), in one spawn."""
    for schedules, windows in run(_compile_worker, 2, timeout=280):
        _check_compiled(schedules)
        _check_window(windows)


def test_the_op_passes_torch_library_opcheck():
    from torch.library import opcheck

    for algo in ("tokenring", "ulysses"):  # none kept, and five kept tensors
        q, k, v, _ = _qkv(0)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        call = attention_call.Call(algo, True, "zigzag", None, "full", "auto", None, "", True, True)
        opcheck(attention_op.attention_fwd, (q, k, v, [], *call.args()))


# ----------------------------------------------------------------------------------------------
# window=: the Λ ring as a route of the same op
# ----------------------------------------------------------------------------------------------

WINDOW_CASES = [  # (window: int w or (n_global, n_local, limit_distance), algorithm); shards of 8 tokens
    (3, "ring"),
    (10, "tokenring"),  # wider than a shard: two predecessors' keys at W > 2
    ((2, 5, None), "ring"),  # Λ: the global branch re-rotated with inv_freq inside the op
    ((3, 6, 4), "tokenring"),  # limit_distance below the window
]


def _window_cases(world: int, backend: str = "aot_eager") -> dict:
    """Per window case: (graphs, breaks) under explain, graphs under fullgraph=True, the largest
    difference between a fullgraph-compiled step and the eager one, and whether the kept tensors the
    op's fake announces have the real ones' shapes and dtypes."""
    from ringrt.lm_infinite import LambdaMask
    from ringrt.ops.rope import inv_freq

    freqs = inv_freq(8, 10000.0, torch.device("cpu"))
    res = {}
    for window, algo in WINDOW_CASES:
        w = window if isinstance(window, int) else LambdaMask(n_global=window[0], n_local=window[1], limit_distance=window[2])
        q, k, v, do = (ringrt.shard(x, layout="contiguous") for x in _qkv(2, s=8 * world))

        def f(q, k, v, w=w, algo=algo):
            return ringrt.attention(q, k, v, window=w, inv_freq=freqs, algorithm=algo, timeout=60)

        explained = _graphs(f, q, k, v)
        full = _fullgraph_graphs(f, q, k, v)
        torch._dynamo.reset()
        eager = _step(f, q, k, v, do, None)
        compiled = _step(torch.compile(f, fullgraph=True, backend=backend), q, k, v, do, None)
        res[(window, algo)] = (explained, full, max((a - b).abs().max().item() for a, b in zip(eager, compiled, strict=True)),
                               _kept_matches_fake(q, k, v, w, algo, freqs))
    return res


def _kept_matches_fake(q, k, v, mask, algo, freqs) -> bool:
    from ringrt.distributed.groups import by_name, group_name
    from ringrt.lm_infinite import route, sliding_window

    mask = sliding_window(mask) if isinstance(mask, int) else mask
    call = attention_call.Call(route.ROUTE, True, "contiguous", None, "full", "auto", 60.0, group_name(None), False, False,
                               route.options(mask, algo))
    extra = [freqs] if mask.n_global else []
    _, _, kept = attention_op.run_forward(q, k, v, extra, call)
    _, rank, world = by_name(call.group)
    return [(tuple(t.shape), t.dtype) for t in kept] == route._kept(q, k, rank, world, call.options)


def _check_window(res: dict) -> None:
    assert len(res) == len(WINDOW_CASES)
    for case, (explained, full, diff, kept_ok) in res.items():
        assert explained == (1, 0), (case, explained)
        assert full == 1, (case, full)
        assert diff == 0.0, (case, diff)  # eager and compiled run the same route on the same inputs
        assert kept_ok, case


def test_window_compiles_without_graph_breaks_on_one_process():
    _check_window(_window_cases(1))


def test_the_window_route_passes_torch_library_opcheck():
    from torch.library import opcheck

    from ringrt.lm_infinite import LambdaMask, route
    from ringrt.ops.rope import inv_freq

    q, k, v, _ = _qkv(0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = LambdaMask(n_global=2, n_local=3)
    call = attention_call.Call(route.ROUTE, True, "contiguous", None, "full", "auto", None, "", True, False, route.options(mask, "ring"))
    opcheck(attention_op.attention_fwd, (q, k, v, [inv_freq(8, 10000.0, q.device)], *call.args()))


# ----------------------------------------------------------------------------------------------
# the agreement, once per signature
# ----------------------------------------------------------------------------------------------


def _cache_worker(rank, world):
    import os

    from ringrt.distributed import agree

    calls = []
    real = attention_call.agree

    def counted(*a, **kw):
        calls.append(a[4][0].shape)  # meta_args: (q, k, ...)
        return real(*a, **kw)

    attention_call.agree = counted
    q, k, v, _ = _qkv(rank)
    counts = {}
    for name, fn in (
        ("first", lambda: ringrt.attention(q, k, v)),
        ("same", lambda: ringrt.attention(q, k, v)),
        ("same_again", lambda: ringrt.attention(q, k, v)),
        ("new_shape", lambda: ringrt.attention(q[:, :4], k[:, :4], v[:, :4])),
        ("back", lambda: ringrt.attention(q, k, v)),
        ("return_lse", lambda: ringrt.attention(q, k, v, return_lse=True)),
    ):
        fn()
        counts[name] = len(calls)
    # a first call the ranks disagree on (a signature new to both) still raises the same ValueError on every rank
    counts["disagree"] = caught(lambda: ringrt.attention(q[:, :6], k[:, :6], v[:, :6], causal=rank == 0, layout="zigzag", timeout=30))
    counts["disagree_calls"] = len(calls)
    os.environ["RINGRT_AGREE_CACHE"] = "0"
    ringrt.attention(q, k, v)
    counts["off"] = len(calls)
    os.environ.pop("RINGRT_AGREE_CACHE")
    agree.clear_cache()
    ringrt.attention(q, k, v)
    ringrt.attention(q, k, v)
    counts["cleared"] = len(calls)
    return counts


@pytest.mark.timeout(120)
def test_the_ranks_agree_once_per_signature():
    for counts in run(_cache_worker, 2, timeout=90):
        assert counts["first"] == 1 and counts["same"] == 1 and counts["same_again"] == 1, counts
        assert counts["new_shape"] == 2 and counts["back"] == 2 and counts["return_lse"] == 3, counts
        err = counts["disagree"]
        assert err.get("type") == "ValueError" and "the ranks disagree on causal (rank 0: True, rank 1: False" in err["msg"], err
        assert counts["disagree_calls"] == 4, counts
        assert counts["off"] == 5, counts  # RINGRT_AGREE_CACHE=0: every call agrees
        assert counts["cleared"] == 6, counts  # clear_cache(): the next call agrees, the one after does not


def _lone_signature_worker(rank, world):
    q, k, v, _ = _qkv(0)
    ringrt.attention(q, k, v, timeout=1.5)  # agreed: remembered on both ranks
    if rank == 1:
        q, k, v = (x[:, :4] for x in (q, k, v))  # a signature only rank 1 uses: it alone agrees again
    return caught(lambda: ringrt.attention(q, k, v, timeout=1.5))


@pytest.mark.timeout(60)
def test_a_rank_that_alone_changes_signature_times_out_instead_of_computing_a_wrong_result():
    results = run_faulty(_lone_signature_worker, 2, timeout=30)
    for rank, err in enumerate(results):
        assert err.get("comm_error"), (rank, err)  # CommTimeout, or the closed connection of the peer that gave up
        assert err["after"] < 10, (rank, err)
    assert "checking the inputs with the other ranks" in results[1]["msg"], results[1]  # rank 1 waited in the agreement


# ----------------------------------------------------------------------------------------------
# return_lse: values and gradients against fp64
# ----------------------------------------------------------------------------------------------


def _reference_lse(q, k, causal: bool) -> torch.Tensor:
    """(B, H, S) natural-log sum-exp of the scaled scores over the attended keys, fp64, differentiable."""
    heads, kv_heads = q.shape[2], k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(heads // kv_heads, dim=2))
    scores = scores / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[1]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def _lse_worker(rank, world):
    heads, kv_heads = (8, 2) if world == 4 else (4, 2)  # Ulysses at W = 4 replicates the K/V heads
    errors = {}
    for algo in ringrt.ALGORITHMS:
        for causal in (True, False):
            for lse_only in (False, True):  # True: the output gets no gradient (the kernel's dout = 0 rows)
                if lse_only and not causal:
                    continue
                g = torch.Generator().manual_seed(7)
                q, k, v, do = _qkv(3, s=8 * world, heads=heads, kv_heads=kv_heads, dtype=torch.float64)
                dl = torch.randn(2, heads, 8 * world, generator=g, dtype=torch.float64)
                layout = "zigzag" if causal else "contiguous"
                ql, kl, vl = (ringrt.shard(x, layout=layout).requires_grad_() for x in (q, k, v))
                out, lse = ringrt.attention(ql, kl, vl, causal=causal, algorithm=algo, return_lse=True, timeout=60)
                loss = (lse * ringrt.shard(dl, layout=layout, dim=2)).sum()
                if not lse_only:
                    loss = loss + (out * ringrt.shard(do, layout=layout)).sum()
                loss.backward()
                qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
                ref_out = reference_attention(qr, kr, vr, causal=causal)
                ref_lse = _reference_lse(qr, kr, causal)
                ref_loss = (ref_lse * dl).sum() + (0 if lse_only else (ref_out * do).sum())
                ref_loss.backward()
                ref_dv = vr.grad if vr.grad is not None else torch.zeros_like(v)  # lse alone does not depend on v
                got = [lse, out, ql.grad, kl.grad, vl.grad]
                want = [ringrt.shard(ref_lse, layout=layout, dim=2), *(ringrt.shard(t, layout=layout)
                                                                      for t in (ref_out, qr.grad, kr.grad, ref_dv))]
                assert lse.dtype == torch.float64 and lse.shape == (2, heads, 8)
                errors[(algo, causal, lse_only)] = max((a.detach() - b.detach()).abs().max().item()
                                                       for a, b in zip(got, want, strict=True))
    return errors


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_return_lse_values_and_gradients_match_fp64(world):
    for rank, errors in enumerate(run(_lse_worker, world, timeout=200)):
        assert len(errors) == 3 * len(ringrt.ALGORITHMS)
        for key, err in errors.items():
            assert err < 1e-12, (rank, key, err)  # fp64 end to end: rounding of O(S) sums, ~1e-15


@pytest.mark.parametrize("kernel", ["cpu", "math"])
def test_a_block_backward_with_an_lse_gradient_matches_autograd(kernel):
    """LseGradKernel: delta - dlse taken as given, rows whose dout is 0 included (one all-zero head)."""
    from ringrt.ops.kernels import get_kernel
    from ringrt.ops.lse_grad import LseGradKernel
    from ringrt.ops.merge import grad_delta

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)  # (B, H, S, D), heads-first
    k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout, dlse = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    dout[1, 2] = 0
    dout[0, 0, 3] = 0
    kern = LseGradKernel(get_kernel(q.device, kernel))
    out, lse = kern.forward(q, k, v, causal=True, mask=None, scale=0.3)
    delta = grad_delta(dout, out, lse.dtype, dlse)
    got = kern.backward(dout, q, k, v, lse, delta, causal=True, mask=None, scale=0.3, out=out)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", qr, kr.repeat_interleave(2, dim=1)) * 0.3
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    ref_out = torch.softmax(scores, -1) @ vr.repeat_interleave(2, dim=1)
    ((ref_out * dout).sum() + (torch.logsumexp(scores, -1) * dlse).sum()).backward()
    for a, b in zip(got, (qr.grad, kr.grad, vr.grad), strict=True):
        assert (a - b).abs().max().item() < 1e-12


def test_return_lse_dtype_and_a_bad_value():
    q, k, v, _ = _qkv(0, dtype=torch.bfloat16)
    out, lse = ringrt.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (2, 4, 8)
    with pytest.raises(ValueError, match=r"return_lse='yes' must be True or False"):
        ringrt.attention(q, k, v, return_lse="yes")
