"""Single-process pieces: merge, block kernels, layouts, padding, packing."""

from __future__ import annotations

import math

import pytest
import torch

from ringrt.distributed import comm
from ringrt.ops import layout
from ringrt.ops.kernels import CpuKernel, MathKernel, get_kernel, surrogate_out
from ringrt.ops.merge import empty_accumulator, merge_
from tests.reference import reference_attention

torch.manual_seed(0)


def _bhsd(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def _lse_ref(q, k, scale, mask=None):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None:
        s = s + mask
    return torch.logsumexp(s, -1)


@pytest.mark.parametrize("kernel", [CpuKernel(), MathKernel()], ids=["cpu", "math"])
def test_merge_of_key_splits_equals_attention_over_all_keys(kernel):
    B, H, Hkv, S, D = 2, 4, 2, 12, 10
    q, k, v = _bhsd(B, H, S, D), _bhsd(B, Hkv, S, D), _bhsd(B, Hkv, S, D)
    scale = 1 / math.sqrt(D)
    out, lse = empty_accumulator(q)
    for lo, hi in [(0, 5), (5, 6), (6, 12)]:
        o, l = kernel.forward(q, k[:, :, lo:hi], v[:, :, lo:hi], causal=False, mask=None, scale=scale)
        merge_(out, lse, o, l)
    ref = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    ke = k.repeat_interleave(2, 1)
    torch.testing.assert_close(lse, _lse_ref(q, ke, scale), atol=1e-12, rtol=0)


def test_merge_with_empty_rows_never_makes_nan():
    out, lse = empty_accumulator(torch.zeros(1, 1, 3, 4))
    bo = torch.tensor([[[[1.0] * 4, [2.0] * 4, [0.0] * 4]]])
    bl = torch.tensor([[[0.5, float("-inf"), float("-inf")]]])
    merge_(out, lse, bo, bl)  # row 0 gets the block, rows 1-2 stay empty (both sides -inf)
    assert torch.equal(out[0, 0, 0], torch.ones(4)) and float(lse[0, 0, 0]) == 0.5
    assert torch.equal(out[0, 0, 1:], torch.zeros(2, 4)) and torch.isneginf(lse[0, 0, 1:]).all()
    merge_(out, lse, torch.full((1, 1, 3, 4), 3.0), torch.tensor([[[0.5, 0.0, float("-inf")]]]))
    assert torch.allclose(out[0, 0, 0], torch.full((4,), 2.0)) and math.isclose(float(lse[0, 0, 0]), 0.5 + math.log(2), rel_tol=1e-6)  # fp32
    assert torch.equal(out[0, 0, 1], torch.full((4,), 3.0)) and not torch.isnan(out).any()


def test_cpu_kernel_reports_fully_masked_rows_as_empty_and_gives_them_no_gradient():
    B, H, S, D = 1, 2, 6, 8
    q, k, v = _bhsd(B, H, S, D), _bhsd(B, H, S, D), _bhsd(B, H, S, D)
    mask = torch.zeros(S, S, dtype=torch.float64)
    mask[2, :] = float("-inf")  # query 2 sees no key
    mask[:, 4] = float("-inf")
    kern = CpuKernel()
    out, lse = kern.forward(q, k, v, causal=False, mask=mask, scale=0.3)
    assert torch.isneginf(lse[:, :, 2]).all() and torch.equal(out[:, :, 2], torch.zeros(B, H, D))
    ref_lse = _lse_ref(q, k, 0.3, mask)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    dout = _bhsd(B, H, S, D)
    delta = (dout * out).sum(-1)
    dq, dk, dv = kern.backward(dout, q, k, v, lse, delta, causal=False, mask=mask, scale=0.3)
    mq, mk, mv = MathKernel().backward(dout, q, k, v, lse, delta, causal=False, mask=mask, scale=0.3)
    assert torch.equal(dq[:, :, 2], torch.zeros(B, H, D)) and not torch.isnan(dq).any()
    for a, b in [(dq, mq), (dk, mk), (dv, mv)]:
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", [CpuKernel(), MathKernel()], ids=["cpu", "math"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_backward_from_final_lse_matches_autograd(kernel, causal):
    """Two key blocks, each differentiated with the FINAL lse and delta, sum to the full gradient."""
    B, H, Hkv, S, D = 2, 4, 1, 10, 6
    q, k, v = (_bhsd(B, h, S, D).requires_grad_() for h in (H, Hkv, Hkv))
    ref = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    scale = 1 / math.sqrt(D)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = kernel.forward(qd, kd, vd, causal=causal, mask=None, scale=scale)
    delta = (dout * out).sum(-1)
    # split keys into [0, 4) and [4, 10): an explicit causal mask for each off-diagonal part
    pos_q = torch.arange(S).unsqueeze(1)
    dq = torch.zeros_like(qd)
    for lo, hi in [(0, 4), (4, S)]:
        m = None
        if causal:
            m = torch.zeros(S, hi - lo, dtype=torch.float64).masked_fill(torch.arange(lo, hi).unsqueeze(0) > pos_q, float("-inf"))
        gq, gk, gv = kernel.backward(dout, qd, kd[:, :, lo:hi], vd[:, :, lo:hi], lse, delta, causal=False, mask=m, scale=scale)
        dq += gq
        torch.testing.assert_close(gk, k.grad[:, :, lo:hi], atol=1e-10, rtol=0)
        torch.testing.assert_close(gv, v.grad[:, :, lo:hi], atol=1e-10, rtol=0)
    torch.testing.assert_close(dq, q.grad, atol=1e-10, rtol=0)


def test_surrogate_out_reproduces_delta():
    dout = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    dout[0, 0, 0] = 0.0
    delta = torch.randn(2, 3, 5, dtype=torch.float64)
    delta[0, 0, 0] = 0.0
    o = surrogate_out(dout, delta)
    torch.testing.assert_close((dout * o).sum(-1), delta, atol=1e-12, rtol=0)
    assert torch.equal(o[0, 0, 0], torch.zeros(8))


def test_cpu_backward_with_the_real_output_equals_the_surrogate_path():
    """Callers that hold the final output pass it as ``out``; the gradients equal those rebuilt from delta."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 4, 48, 16, generator=g) for _ in range(4))
    kern = CpuKernel()
    for causal in (True, False):
        out, lse = kern.forward(q, k, v, causal=causal, mask=None, scale=0.25)
        delta = (dout * out).sum(-1)
        with_out = kern.backward(dout, q, k, v, lse, delta, causal=causal, mask=None, scale=0.25, out=out)
        rebuilt = kern.backward(dout, q, k, v, lse, delta, causal=causal, mask=None, scale=0.25)
        exact = MathKernel().backward(*(x.double() for x in (dout, q, k, v, lse, delta)), causal=causal, mask=None, scale=0.25)
        for a, b, ref in zip(with_out, rebuilt, exact, strict=True):
            # fp32 block gradients of O(1) entries: both paths within 2e-5 of fp64 and of each other
            torch.testing.assert_close(a.double(), ref, atol=2e-5, rtol=0)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


@pytest.mark.parametrize("lay", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_assemble_round_trip_and_positions(lay, world):
    n = layout.num_chunks(lay, world)
    x = torch.arange(2 * 3 * n * 5).view(2, 3 * n, 5)
    shards = [layout.shard_of(x, lay, r, world, dim=1) for r in range(world)]
    assert torch.equal(layout.assemble(shards, lay, dim=1), x)
    for r, s in enumerate(shards):
        pos = layout.positions(lay, r, world, s.shape[1])
        assert torch.equal(s[0, :, 0], x[0, pos, 0])
        assert bool((pos[1:] > pos[:-1]).all())  # local order follows global order


def test_zigzag_chunks_w2():
    assert [layout.rank_chunks("zigzag", r, 2) for r in range(2)] == [[0, 3], [1, 2]]


def test_bad_layout_and_indivisible_length_errors():
    with pytest.raises(ValueError, match="layout='ring'.*valid: contiguous, zigzag"):
        layout.num_chunks("ring", 2)
    with pytest.raises(ValueError, match="not divisible by 4.*pad_to_multiple"):
        layout.shard_of(torch.zeros(1, 10), "zigzag", 0, 2, dim=1)


def test_pad_to_multiple_is_exact_under_causal_attention():
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64) for _ in range(3))
    qp, kp, vp = (layout.pad_to_multiple(x, 8, dim=1) for x in (q, k, v))
    assert qp.shape[1] == 16
    full = reference_attention(qp, kp, vp, causal=True)[:, :10]
    torch.testing.assert_close(full, reference_attention(q, k, v, causal=True), atol=1e-14, rtol=0)


def test_pack_unpack_mixed_dtypes_and_odd_offsets():
    ts = [torch.randn(1, 1, 3, 5).half(), torch.randn(1, 1, 3), torch.randn(2, 3).double()]
    buf = comm.pack(ts)
    assert buf.numel() == comm.nbytes([comm.spec_of(t) for t in ts]) == 30 + 12 + 48
    back = comm.unpack(buf, [comm.spec_of(t) for t in ts])
    assert all(torch.equal(a, b) for a, b in zip(ts, back, strict=True))
    with pytest.raises(ValueError, match="packed message has"):
        comm.unpack(buf, [comm.spec_of(ts[0])])


def test_get_kernel_choices():
    assert get_kernel(torch.device("cpu")).name == "cpu"
    assert get_kernel(torch.device("cpu"), "math").name == "math"
    with pytest.raises(ValueError, match="kernel='flash'.*valid: auto, cpu, cuda, math"):
        get_kernel(torch.device("cpu"), "flash")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        get_kernel(torch.device("cpu"), "cuda")
