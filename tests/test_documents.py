"""Packed documents (``cu_seqlens``): every schedule against a per-document fp64 reference at W = 1..4,
the per-document layout against ring-flash-attention's varlen zigzag rule, exact bytes per rank, and
bad boundaries refused on every rank before any transfer.

The reference attends each document on its own (``reference_attention`` on its rows): nothing of
the code under test is used to build it. Lengths are odd, include single-token documents, a
document of length 0, and one long document spanning every rank's every chunk.
"""

from __future__ import annotations

import pytest
import torch

import ringrt
from ringrt.distributed import comm
from ringrt.ops.documents import Documents, assemble_documents, cu_seqlens_from_positions, lengths_problem, shard_documents
from ringrt.schedules import tokenring_plan as tokenring
from tests.distributed import run
from tests.reference import reference_attention
from tests.test_schedules import _expected_bytes

ALGOS = ("tokenring", "ring", "allgather", "ulysses", "hybrid", "auto")
DOC_SETS = ([5, 1, 12, 3], [1, 1, 1], [37], [0, 7, 0, 2])
B, D = 2, 8


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def per_document_reference(q, k, v, lengths, *, causal=True):
    """Each document attended alone, in fp64: (B, S, H, D), differentiable."""
    outs, s = [], 0
    for n in lengths:
        if n:
            outs.append(reference_attention(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], causal=causal))
        s += n
    return torch.cat(outs, dim=1)


def _heads(world):
    return [(6, 6), (6, 3)] if world == 3 else [(4, 4), (4, 2)]


# ---- the layout: pure index math ---------------------------------------------------------------


def _ring_flash_extract_local(x, cu, rank, world):
    """ring-flash-attention's varlen zigzag rule, written from its definition: each document cut into
    2W chunks, rank r takes chunks r and 2W-1-r, document after document."""
    parts = []
    for a, b in zip(cu.tolist(), cu.tolist()[1:], strict=False):
        chunks = x[:, a:b].chunk(2 * world, dim=1)
        parts += [chunks[rank], chunks[2 * world - 1 - rank]]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_is_ring_flash_attention_varlen_zigzag_where_that_is_defined(world):
    lengths = [2 * world * m for m in (1, 3, 2, 5)]
    cu = _cu(lengths)
    x = torch.arange(sum(lengths)).view(1, -1)
    docs = Documents(tuple(lengths), "zigzag", world)
    for r in range(world):
        assert torch.equal(shard_documents(x, docs, r), _ring_flash_extract_local(x, cu, r, world))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_and_positions_of_any_lengths(world, layout):
    lengths = (5, 1, 12, 0, 3)
    docs = Documents(lengths, layout, world)
    n = 2 * world if layout == "zigzag" else world
    x = torch.arange(1, sum(lengths) + 1).view(1, -1, 1)
    shards = [shard_documents(x, docs, r, value=0) for r in range(world)]
    assert {s.shape[1] for s in shards} == {docs.local_len}
    assert docs.local_len * world == sum(-(-n_ // n) * n for n_ in lengths)
    assert torch.equal(assemble_documents(shards, docs), x)
    # every real token once; padding (0) only at a document's end; positions restart per document
    want_pos = torch.cat([torch.arange(n_) for n_ in lengths])
    for r, s in enumerate(shards):
        pos = docs.local_positions(r)
        real = s[0, :, 0] > 0
        assert torch.equal(pos[real], want_pos[s[0, real, 0] - 1])
        assert torch.equal(ringrt.positions(layout, r, world, docs.local_len, cu_seqlens=_cu(lengths)), pos)
    # chunk-major: each virtual chunk holds document i at the same offsets
    perm = docs.chunk_major()
    assert sorted(perm.tolist()) == list(range(docs.local_len))


def test_boundaries_from_positions_and_bad_boundaries_named():
    assert cu_seqlens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])).tolist() == [0, 3, 5, 9]
    assert cu_seqlens_from_positions(torch.tensor([0])).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"position_ids\[2\]=5"):
        cu_seqlens_from_positions(torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="must start at 0"):
        cu_seqlens_from_positions(torch.tensor([1, 2]))
    assert "must start at 0" in lengths_problem(torch.tensor([1, 4]))
    assert "must not decrease" in lengths_problem(torch.tensor([0, 4, 3]))
    assert "integer" in lengths_problem(torch.tensor([0.0, 4.0]))
    assert "at least 2" in lengths_problem(torch.tensor([0]))
    assert "no tokens" in lengths_problem(torch.tensor([0, 0]))
    assert lengths_problem(torch.tensor([0, 0, 3])) is None  # an empty document is a document
    with pytest.raises(ValueError, match="describes 9"):
        ringrt.shard(torch.zeros(1, 8), layout="zigzag", cu_seqlens=torch.tensor([0, 9]))


def test_document_kernel_is_a_block_diagonal_mask():
    """One process: DocumentKernel on a block of n_q x n_k virtual chunks against the math kernel with
    the same-document mask written out densely (forward and backward)."""
    from ringrt.ops.document_kernel import DocumentKernel
    from ringrt.ops.kernels import MathKernel

    slots = (2, 1, 2, 3, 1)  # sizes repeat: documents batched by size
    big_c = sum(slots)
    doc_of = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(slots))
    g = torch.Generator().manual_seed(0)
    for n_q, n_k, causal in ((1, 1, True), (2, 2, True), (2, 1, False), (3, 2, False)):
        q = torch.randn(2, 4, n_q * big_c, D, generator=g, dtype=torch.float64)
        k, v = (torch.randn(2, 2, n_k * big_c, D, generator=g, dtype=torch.float64) for _ in range(2))
        same = doc_of.repeat(n_q)[:, None] == doc_of.repeat(n_k)[None, :]
        mask = torch.zeros(same.shape, dtype=torch.float64).masked_fill(~same, float("-inf"))
        want = MathKernel().forward(q, k, v, causal=causal, mask=mask, scale=0.3)
        kern = DocumentKernel(MathKernel(), slots)
        got = kern.forward(q, k, v, causal=causal, mask=None, scale=0.3)
        for a, b in zip(got, want, strict=True):
            assert (a - b).abs().max().item() < 1e-13
        dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
        delta = (dout * want[0]).sum(-1)
        gw = MathKernel().backward(dout, q, k, v, want[1], delta, causal=causal, mask=mask, scale=0.3)
        gg = kern.backward(dout, q, k, v, want[1], delta, causal=causal, mask=None, scale=0.3)
        for a, b in zip(gg, gw, strict=True):
            assert (a - b).abs().max().item() < 1e-13
        per = [(n_q * c) * (n_q * c + 1) // 2 if causal and n_q == n_k else n_q * c * n_k * c for c in slots]
        assert kern.scores == 2 * 4 * sum(per)


# ---- every schedule at W = 1..4 -----------------------------------------------------------------


def _bytes_tokenring(rank, world, s_l, heads, elt=8, acc=8):
    """TokenRing's bytes on the direct topology, causal zigzag, from its rules (as in
    test_core_attention, for a shard of ``s_l`` rows)."""
    c = s_l // 2
    q_fwd, out_fwd = B * heads * D * elt, B * heads * (D * elt + acc)
    q_bwd, out_bwd = B * heads * (2 * D * elt + 2 * acc), B * heads * D * elt
    qs = sum(2 * c if (rank - s - 1) % world < rank else c for s in range(world - 1))  # own q, straight to its visitor
    qr = sum(2 * c if rank < (rank + s + 1) % world else c for s in range(world - 1))
    os_ = sum(2 * c if (rank + s) % world > rank else c for s in range(1, world))
    or_ = sum(2 * c if rank > (rank - s) % world else c for s in range(1, world))
    return ({"q": qs * (q_fwd + q_bwd), "out": os_ * (out_fwd + out_bwd)},
            {"q": qr * (q_fwd + q_bwd), "out": or_ * (out_fwd + out_bwd)})


PIECE_BYTES = tokenring.PIECE_BYTES


def _worker(rank, world):
    errors, traffic = {}, {}
    for lengths in DOC_SETS:
        cu = _cu(lengths)
        docs = Documents(tuple(lengths), "zigzag", world)
        for heads, kv_heads in _heads(world):
            g = torch.Generator().manual_seed(sum(lengths) + heads + kv_heads)
            s = sum(lengths)
            q = torch.randn(B, s, heads, D, generator=g, dtype=torch.float64)
            k, v = (torch.randn(B, s, kv_heads, D, generator=g, dtype=torch.float64) for _ in range(2))
            do = torch.randn(B, s, heads, D, generator=g, dtype=torch.float64)
            qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
            ref = per_document_reference(qr, kr, vr, lengths)
            ref.backward(do)
            want = (ref.detach(), qr.grad, kr.grad, vr.grad)
            for algo in ALGOS:
                for topology in ("full", "ring", "pieces") if algo == "tokenring" else ("full",):
                    ql, kl, vl = (ringrt.shard(x, layout="zigzag", cu_seqlens=cu).requires_grad_() for x in (q, k, v))
                    assert ql.shape[1] == docs.local_len
                    comm.reset_stats()
                    # "pieces": queries cut one piece per query head (Note [TokenRing overlap])
                    tokenring.PIECE_BYTES = 1 if topology == "pieces" else PIECE_BYTES
                    out = ringrt.attention(ql, kl, vl, cu_seqlens=cu, algorithm=algo, kernel="math",
                                           topology="full" if topology == "pieces" else topology)
                    out.backward(ringrt.shard(do, layout="zigzag", cu_seqlens=cu))
                    st = {n: (c.bytes_sent, c.bytes_recv) for n, c in comm.stats().items() if c.bytes_sent or c.bytes_recv}
                    got = [ringrt.unshard(t.detach(), layout="zigzag", cu_seqlens=cu) for t in (out, ql.grad, kl.grad, vl.grad)]
                    key = (tuple(lengths), heads, kv_heads, algo, topology)
                    errors[key] = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
                    traffic[key] = (docs.local_len, st)
    return errors, traffic


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_schedule_is_exact_per_document_with_the_bytes_of_its_formula(world):
    results = run(_worker, world, timeout=360)
    for rank, (errors, traffic) in enumerate(results):
        assert len(errors) == len(DOC_SETS) * 2 * (len(ALGOS) + 2)
        for key, err in errors.items():
            # fp64 end to end: rounding of short sums, measured <= 4e-15; 1e-12 leaves 250x headroom
            assert err < 1e-12, (rank, key, err)
        for (lengths, heads, kv_heads, algo, topology), (s_l, st) in traffic.items():
            sent, recv = {n: v[0] for n, v in st.items()}, {n: v[1] for n, v in st.items()}
            if world == 1 or algo == "auto" or topology == "ring":
                assert world > 1 or sent == recv == {}
                continue  # auto: its pick's bytes; the relay's bytes: test_core_attention (same shapes)
            if algo == "tokenring":
                want_sent, want_recv = _bytes_tokenring(rank, world, s_l, heads)
            else:  # the peers send what they receive
                want_sent = want_recv = _expected_bytes(algo, world, heads, kv_heads, batch=B, per_rank=s_l, d=D)
            assert (sent, recv) == (want_sent, want_recv), (rank, lengths, heads, kv_heads, algo, sent, recv)


# ---- other settings, and what is refused ---------------------------------------------------------


def _settings_worker(rank, world):
    from ringrt.distributed.agree import clear_cache

    res = {}
    lengths = [3, 6, 1, 5]
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(7)
    s = sum(lengths)
    q, k, v = (torch.randn(B, s, 4, D, generator=g, dtype=torch.float64) for _ in range(3))
    sh = lambda x: ringrt.shard(x, layout="zigzag", cu_seqlens=cu)  # noqa: E731
    # return_lse: the per-document log-sum-exp
    out, lse = ringrt.attention(sh(q), sh(k), sh(v), cu_seqlens=cu, return_lse=True, kernel="math")
    want = []
    for a, b in zip(cu.tolist(), cu.tolist()[1:], strict=False):
        sc = torch.einsum("bqhd,bkhd->bhqk", q[:, a:b], k[:, a:b]) / D**0.5
        want.append(sc.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1))
    full_lse = ringrt.unshard(lse, layout="zigzag", cu_seqlens=cu, dim=2)
    res["lse"] = (full_lse - torch.cat(want, dim=2)).abs().max().item()
    # 3-D (tokens, heads, head_dim) inputs, flash-attn's varlen format
    out3 = ringrt.attention(sh(q)[0], sh(k)[0], sh(v)[0], cu_seqlens=cu, kernel="math")
    res["thd"] = (out3 - out[0]).abs().max().item()
    # non-causal over lengths that need no padding; contiguous layout
    lengths_nc = [2 * world, 4 * world, 2 * world]
    cu_nc = _cu(lengths_nc)
    qn, kn, vn = (torch.randn(1, sum(lengths_nc), 2, D, generator=g, dtype=torch.float64) for _ in range(3))
    for layout in ("zigzag", "contiguous"):
        sl = [ringrt.shard(x, layout=layout, cu_seqlens=cu_nc) for x in (qn, kn, vn)]
        o = ringrt.attention(*sl, cu_seqlens=cu_nc, causal=False, layout=layout, algorithm="ring", kernel="math")
        ref = per_document_reference(qn, kn, vn, lengths_nc, causal=False)
        res[f"noncausal_{layout}"] = (ringrt.unshard(o, layout=layout, cu_seqlens=cu_nc) - ref).abs().max().item()
    # refusals, on every rank, before any transfer
    clear_cache()
    ql, kl, vl = sh(q), sh(k), sh(v)
    cases = {
        "other_cu": dict(cu_seqlens=_cu([2, 7, 1, 5]) if rank == world - 1 else cu),
        "decreasing": dict(cu_seqlens=torch.tensor([0, 5, 3, 15])),
        "float_cu": dict(cu_seqlens=cu.double()),
        "list_cu": dict(cu_seqlens=[0, 3, 9, 10, 15]),
        "wrong_len": dict(cu_seqlens=_cu([3, 6, 1, 5 + 2 * world])),
        "noncausal_padding": dict(cu_seqlens=cu, causal=False, layout="zigzag"),
        "window": dict(cu_seqlens=cu, window=4, layout="contiguous"),
    }
    for name, kw in cases.items():
        comm.reset_stats()
        try:
            ringrt.attention(ql, kl, vl, **kw)
            res[name] = "no error"
        except ValueError as e:
            p2p = {n: c.bytes_sent for n, c in comm.stats().items() if n not in ("agree",) and c.bytes_sent}
            res[name] = (str(e), p2p)
    return res


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [1, 2])
def test_lse_thd_noncausal_and_refusals_on_every_rank(world):
    for rank, res in enumerate(run(_settings_worker, world, timeout=180)):
        assert res["lse"] < 1e-12 and res["thd"] == 0.0, res
        assert res["noncausal_zigzag"] < 1e-12 and res["noncausal_contiguous"] < 1e-12, res
        want = {
            "other_cu": "disagree on document lengths" if world > 1 else None,
            "decreasing": "must not decrease",
            "float_cu": "integer tensor",
            "list_cu": "torch.Tensor",
            "wrong_len": "does not match cu_seqlens",
            "noncausal_padding": "causal=False with cu_seqlens needs every document length to be a multiple",
            "window": "cannot be used with cu_seqlens",
        }
        for name, text in want.items():
            if text is None:
                continue
            msg, p2p = res[name]
            assert text in msg, (rank, name, msg)
            assert p2p == {}, (rank, name, p2p)


def test_a_packed_call_compiles_fullgraph_and_passes_opcheck():
    from torch.library import opcheck

    from ringrt.schedules import op as attention_op
    from ringrt.schedules.call import Call
    from ringrt.schedules.documents import DOCUMENTS
    from tests.test_compile import _fullgraph_graphs, _graphs, _step

    lengths = [5, 1, 12, 3]
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (ringrt.shard(torch.randn(2, 21, h, D, generator=g), layout="zigzag", cu_seqlens=cu) for h in (4, 2, 2, 4))
    dl = torch.randn(2, 4, q.shape[1], generator=g)
    for algo in ("tokenring", "auto"):
        def f(q, k, v, algo=algo):
            return ringrt.attention(q, k, v, cu_seqlens=cu, algorithm=algo, return_lse=True)

        assert _graphs(f, q, k, v, run_time_sizes=algo == "auto") == (1, 0)
        assert _fullgraph_graphs(f, q, k, v) == 1
        torch._dynamo.reset()
        eager = _step(f, q, k, v, do, dl)
        compiled = _step(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do, dl)
        assert max((a - b).abs().max().item() for a, b in zip(eager, compiled, strict=True)) == 0.0
    call = Call("tokenring", True, "zigzag", None, "full", "auto", None, "", True, True, (DOCUMENTS,))
    opcheck(attention_op.attention_fwd, (*(x.requires_grad_() for x in (q, k, v)), [cu], *call.args()))
