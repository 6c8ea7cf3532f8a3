"""NaN comes out exactly where the math puts it (``ringrt/ops/kernels.py``, "NaN"), at W = 1, 2, 3.

One query, key or value row (batch 0, every head) is NaN. Two oracles, neither sharing code with ringrt:

* the rule for output rows: a NaN query row spoils that row only; a NaN key or value row spoils the
  rows that attend it (causal: rows >= its position; non-causal: all rows; Λ: rows whose window or
  global set holds it); rows of the other batch element never;
* for every entry of out, dq, dk, dv: it depends on the row iff it changes (bit for bit) when the
  fp64 reference is run again with that row moved to other finite values (a masked key contributes
  an exact 0, so independent entries come out identical).

Ours must be NaN exactly on the dependent entries (the rule above for out, the second oracle for
everything) and, elsewhere, match the fp64 reference on the finite input. Plain PyTorch would not:
``softmax(s) @ v`` spreads a NaN value at a masked position to every row through 0 * NaN.
"""

from __future__ import annotations

import pytest
import torch

import ringrt
from ringrt import LambdaMask, lambda_attention
from tests.distributed import run
from tests.reference import reference_attention
from tests.test_lambda_reference import lambda_reference

B, D, PER_RANK = 2, 8, 8  # zigzag: chunks of 4 tokens; contiguous: 8 tokens per rank
POS = 5  # the NaN token: zigzag chunk 1 (rank 1's first chunk at W = 2, 3); contiguous: rank 0's
LAMBDA = dict(n_global=2, n_local=5)  # Λ windows of 5 reach across a shard boundary
LAMBDA_POS = ((6, "qkv"), (1, "k"))  # a local token (rows 6..10, ranks 0 and 1) and a global one (rows >= 1)
TOL = 1e-5  # fp32 against the fp64 reference, O(1) inputs: measured <= 1.1e-6 here (as in test_core_attention)


def _heads(algorithm: str) -> tuple[int, int]:
    # GQA where every world size allows it; Ulysses-based schedules need kv_heads divisible by W = 2, 3
    return (6, 6) if algorithm in ("ulysses", "hybrid", "auto") else (6, 3)


def _inputs(n: int, heads: int, kv_heads: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, heads, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n, kv_heads, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(B, n, heads, D, generator=g, dtype=torch.float64)


def _with(qkv: tuple, which: str, pos: int, value) -> tuple:
    """q, k, v with batch 0's token ``pos`` of ``which`` replaced by ``value`` (a scalar or a row)."""
    out = [x.clone() for x in qkv]
    out["qkv".index(which)][0, pos] = value
    return tuple(out)


def _cases(world: int) -> list[tuple]:
    """(api, algorithm, causal, kernel, which, pos); every one runs in the same spawn."""
    kernels = {alg: ("cpu", "math") if alg == "tokenring" or world == 1 else ("cpu",) for alg in ringrt.ALGORITHMS}
    cases = [("attention", alg, causal, kernel, which, POS) for alg in ringrt.ALGORITHMS for causal in (True, False)
             for kernel in kernels[alg] for which in "qkv"]
    cases += [("lambda", alg, True, "cpu", which, pos) for alg in ("ring", "tokenring") for pos, ws in LAMBDA_POS
              for which in ws]
    return cases


def _run_case(rank: int, world: int, case: tuple, dtype=torch.float32) -> list[torch.Tensor]:
    """This rank's part of one case; returns the full (out, dq, dk, dv) (unsharded, every rank)."""
    api, alg, causal, kernel, which, pos = case
    heads, kv_heads = _heads(alg) if api == "attention" else (4, 2)
    q, k, v, do = _inputs(PER_RANK * world, heads, kv_heads, seed=3)
    q, k, v = _with((q, k, v), which, pos, float("nan"))
    if api == "attention":
        layout = "zigzag" if causal else "contiguous"
        ql, kl, vl = (ringrt.shard(x, layout=layout).to(dtype).requires_grad_() for x in (q, k, v))
        out = ringrt.attention(ql, kl, vl, causal=causal, algorithm=alg, kernel=kernel, timeout=60)
        out.backward(ringrt.shard(do, layout=layout).to(dtype))
    else:
        layout = "contiguous"
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        ql, kl, vl = (x[:, sl].to(dtype).requires_grad_() for x in (q, k, v))
        out = lambda_attention(ql, kl, vl, mask=LambdaMask(**LAMBDA), algorithm=alg, kernel=kernel, timeout=60)
        out.backward(do[:, sl].to(dtype))
    if world == 1:
        return [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]
    return [ringrt.unshard(t.detach().contiguous(), layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]


def _worker(rank: int, world: int) -> dict | None:
    res = {case: _run_case(rank, world, case) for case in _cases(world)}
    return res if rank == 0 else None


def _reference(case: tuple, qkv: tuple, do: torch.Tensor) -> list[torch.Tensor]:
    api, _, causal, *_ = case
    q, k, v = (x.clone().requires_grad_() for x in qkv)
    out = reference_attention(q, k, v, causal=causal) if api == "attention" else lambda_reference(q, k, v, **LAMBDA)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]


def _attends(case: tuple, n: int) -> torch.Tensor:
    """(n, n) bool: query row i attends key j, from the definitions (not from ringrt)."""
    api, _, causal, *_ = case
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if api == "lambda":
        return (j <= i) & ((i - j < LAMBDA["n_local"]) | (j < LAMBDA["n_global"]))
    return j <= i if causal else torch.ones(n, n, dtype=torch.bool)


def _check(world: int, results: dict) -> None:
    failures = [f for case, got in results.items() for f in _case_failures(world, case, got)]
    assert not failures, f"{len(failures)} failures of {len(results)} cases:\n" + "\n".join(failures[:12])


def _case_failures(world: int, case: tuple, got: list[torch.Tensor]) -> list[str]:
    """What is wrong with one case's (out, dq, dk, dv); [] when nothing."""
    api, alg, causal, kernel, which, pos = case
    heads, kv_heads = _heads(alg) if api == "attention" else (4, 2)
    n = PER_RANK * world
    q, k, v, do = _inputs(n, heads, kv_heads, seed=3)
    clean = _reference(case, (q, k, v), do)
    other = torch.randn(heads if which == "q" else kv_heads, D, generator=torch.Generator().manual_seed(7),
                        dtype=torch.float64) + 0.5
    moved = _reference(case, _with((q, k, v), which, pos, other), do)
    depends = [a != b for a, b in zip(clean, moved, strict=True)]  # (B, N, H, D) bool each: out, dq, dk, dv

    # the row rule for the output
    rows = torch.zeros(B, n, dtype=torch.bool)
    if which == "q":
        rows[0, pos] = True
    else:
        rows[0] = _attends(case, n)[:, pos]
    assert torch.equal(depends[0].any(-1).any(-1), rows), (case, "the two oracles disagree")
    bad = []

    def rows_of(x):
        return [i for i in range(n) if x[0, i].any()] + (["batch 1"] if x[1].any() else [])

    if not torch.equal(got[0].isnan().any(-1).any(-1), rows):
        bad.append(f"{case} out: NaN rows {rows_of(got[0].isnan())}, want {rows_of(rows[..., None, None])}")
    if which == "q" and not torch.equal(got[1].isnan().any(-1).any(-1), rows):  # its own dq row, no other
        bad.append(f"{case} dq: NaN rows {rows_of(got[1].isnan())}, want {rows_of(rows[..., None, None])}")
    for name, a, dep, ref in zip(("out", "dq", "dk", "dv"), got, depends, clean, strict=True):
        if not torch.equal(a.isnan(), dep):
            bad.append(f"{case} {name}: NaN at rows {rows_of(a.isnan())}, want exactly {rows_of(dep)}")
        err = (a[~dep].double() - ref[~dep]).abs().max().item() if (~dep).any() else 0.0
        if not err <= TOL:
            bad.append(f"{case} {name}: error {err:.3g} on the entries that do not depend on the NaN")
    return bad


@pytest.mark.timeout(120)
def test_nan_single_process():
    results = _worker(0, 1)
    _check(1, results)
    # other dtypes, NaN pattern only: the cheap NaN check and the fills are dtype-generic
    for dtype in (torch.float64, torch.bfloat16):
        for case in (("attention", "tokenring", True, "cpu", "v", POS), ("attention", "ring", False, "math", "q", POS)):
            want = results[case]
            got = _run_case(0, 1, case, dtype)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a.isnan(), b.isnan()), (dtype, case)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_nan_multi_process(world):
    _check(world, run(_worker, world, timeout=200)[0])


def test_merge_zeroes_only_two_empty_rows():
    """(0, -inf) + (0, -inf) stays empty; a NaN lse on either side gives NaN, an empty block changes nothing."""
    from ringrt.ops.merge import merge_

    inf, nan = float("inf"), float("nan")
    lse = torch.tensor([[[-inf, -inf, nan, 0.5, -inf, 0.5]]])  # (B=1, H=1, S=6)
    blk = torch.tensor([[[-inf, nan, -inf, -inf, 0.25, nan]]])
    out = torch.where(lse.isneginf(), 0.0, torch.ones(())).unsqueeze(-1).expand(1, 1, 6, 2).clone()
    bout = torch.where(blk.isneginf(), 0.0, 2 * torch.ones(())).unsqueeze(-1).expand(1, 1, 6, 2).clone()
    merge_(out, lse, bout, blk)
    assert out[0, 0, :, 0].tolist()[0] == 0.0 and lse[0, 0, 0].item() == -inf  # both empty
    assert out[0, 0, 1:3].isnan().all() and lse[0, 0, 1:3].isnan().all()  # NaN lse on either side
    assert out[0, 0, 3].tolist() == [1.0, 1.0] and lse[0, 0, 3].item() == 0.5  # empty block: no change
    assert out[0, 0, 4].tolist() == [2.0, 2.0] and lse[0, 0, 4].item() == 0.25  # empty accumulator
    assert out[0, 0, 5].isnan().all() and lse[0, 0, 5].isnan()


# ---- CUDA kernel paths, on the CPU: how they read what the fused kernels hand back for NaN rows


def _block(sq=8, sk=8, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, s, d, generator=g) for s in (sq, sk, sk)]


def test_cuda_efficient_path_keeps_nan_rows(monkeypatch):
    """aten's efficient kernel (fp64 emulation of ``tests/test_cuda_kernels.py``) behind a mask: the row
    that sees no key gives (0, -inf) even with a NaN query; a NaN query row that sees keys stays NaN."""
    from ringrt.ops.kernels import CudaKernel, MathKernel
    from tests.test_cuda_kernels import EfficientOps

    spy = EfficientOps()
    monkeypatch.setattr(torch.ops.aten, "_efficient_attention_forward", spy.forward)
    q, k, v = _block()
    mask = torch.zeros(8, 8)
    mask[3] = float("-inf")  # row 3 sees nothing
    q[:, :, 3] = float("nan")
    q[:, :, 5] = float("nan")
    kern = CudaKernel(flash=None, capability=(9, 0))
    assert kern.route(q, k, causal=False, mask=mask).path == "efficient"
    out, lse = kern.forward(q, k, v, causal=False, mask=mask, scale=0.35)
    want_out, want_lse = MathKernel().forward(q, k, v, causal=False, mask=mask, scale=0.35)
    assert spy.forwards  # the emulated kernel ran
    assert lse[..., 5].isnan().all() and out[..., 5, :].isnan().all(), "a NaN row must stay NaN"
    assert lse[..., 3].isneginf().all() and (out[..., 3, :] == 0).all(), "a row that sees nothing: (0, -inf)"
    fin = [0, 1, 2, 4, 6, 7]
    torch.testing.assert_close(out[..., fin, :], want_out[..., fin, :], rtol=0, atol=1e-5)
    torch.testing.assert_close(lse[..., fin], want_lse[..., fin], rtol=0, atol=1e-5)


def _fake_flash():
    """A flash-attn 2.8 stand-in with the real epilogue's NaN behaviour: the row max ignores NaN
    (``fmaxf``), and a row whose sum is 0 or NaN gets lse = +inf and out = acc (csrc softmax.h)."""
    import types

    def _flash_attn_forward(q, k, v, *, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                            softcap, alibi_slopes, return_softmax):
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale  # (B, H, Sq, Sk)
        sq, sk = s.shape[-2:]
        if causal:  # bottom-right
            s = s.masked_fill(torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + sk - sq, float("-inf"))
        m = s.masked_fill(s.isnan(), float("-inf")).amax(-1, keepdim=True) if sk else s.new_zeros(*s.shape[:-1], 1)
        m = m.masked_fill(m.isneginf(), 0.0)
        p = torch.exp(s - m)
        total = p.sum(-1)
        bad = (total == 0) | total.isnan()
        lse = torch.where(bad, float("inf"), m.squeeze(-1) + total.log()).float()
        out = torch.einsum("bhqk,bkhd->bqhd", p / torch.where(bad, 1.0, total).unsqueeze(-1), v.double())
        return out.to(q.dtype), lse, None, None

    pkg = types.ModuleType("ringrt_test_fake_flash")
    pkg.__version__ = "2.8.3"
    iface = types.ModuleType("ringrt_test_fake_flash.flash_attn_interface")
    iface._flash_attn_forward = _flash_attn_forward
    return pkg, iface


def test_flash_path_keeps_nan_rows(monkeypatch):
    """flash-attn marks a NaN row and an empty row alike (lse = +inf): ours tells them apart by shape."""
    import sys

    from ringrt.ops.flash import FlashAttn
    from ringrt.ops.kernels import MathKernel

    pkg, iface = _fake_flash()
    monkeypatch.setitem(sys.modules, pkg.__name__, pkg)
    monkeypatch.setitem(sys.modules, iface.__name__, iface)
    fa = FlashAttn(pkg)
    q, k, v = _block(sq=8, sk=8)
    q[:, :, 5] = float("nan")
    out, lse = fa.forward(q, k, v, causal=True, scale=0.35)
    assert lse[..., 5].isnan().all(), "a NaN row must give a NaN lse (flash wrote +inf)"
    want_out, want_lse = MathKernel().forward(q, k, v, causal=True, scale=0.35, mask=None)
    fin = [0, 1, 2, 3, 4, 6, 7]
    torch.testing.assert_close(lse[..., fin], want_lse[..., fin], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., fin, :], want_out[..., fin, :], rtol=0, atol=1e-5)
    q, k, v = _block(sq=8, sk=5)  # bottom-right causal: rows 0..2 see no key
    _, lse = fa.forward(q, k, v, causal=True, scale=0.35)
    assert lse[..., :3].isneginf().all() and lse[..., 3:].isfinite().all()
