"""The ``cuda`` block kernel, checked on a CPU-only machine.

Three ways in, none needing a GPU:

* ``meta`` tensors: aten's real op-argument parsing and shape kernels of
  ``_efficient_attention_forward/_backward`` run on every call (torch's own meta kernel for the
  backward drops its ``out`` argument and so rejects any ``scale``; a fixture registers a faithful one).
* Every call the kernel makes to those two ops is captured (``torch.ops.aten`` patched) and checked
  against the installed op schema and the layout contracts the CUDA kernels rely on but the meta
  kernels do not check: bias strides aligned to 16 bytes, lse handed back padded to 32 rows with +inf,
  ``out`` dense (B, S, H, D). On CPU tensors the captured op is computed by an fp64 emulation with the
  kernel's semantics (NaN rows where no key is seen), so the kernel's own layout work (padding, GQA
  folding, fix-ups) is compared numerically against an independent fp64 reference.
* A CPU stand-in ``flash_attn`` package (``tests/stand_in``) of each calling-convention family.

Tolerances follow flash-attention's rule: the error against the fp64 reference may be at most twice
that of the same formula computed in the inputs' dtype, plus one unit in the last place of the largest
reference value (the rounding of the result itself).
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ringrt.ops.kernels import CudaKernel, MathKernel, get_kernel

STAND_IN = Path(__file__).parent / "stand_in"
REAL_FWD = torch.ops.aten._efficient_attention_forward
REAL_BWD = torch.ops.aten._efficient_attention_backward
_INF = float("inf")
B, H, D = 2, 4, 64
HEADS = [(4, 4), (4, 2), (4, 1)]  # (H, H_kv): MHA, GQA, MQA


def _align(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def _ceil32(n: int) -> int:
    return -(-n // 32) * 32


# ----------------------------------------------------------------------------------------------
# Captured aten calls: schema binding, contracts, meta or fp64 emulation
# ----------------------------------------------------------------------------------------------


def _bind(packet, args: tuple, kwargs: dict) -> dict:
    """Bind a call to the op's installed schema the way the dispatcher does; raise on what it rejects."""
    schema = packet.default._schema
    params = {a.name: a for a in schema.arguments}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise TypeError(f"{schema.name}: {len(args)} positional arguments, at most {len(positional)}")
    # fewer positional arguments than parameters: the rest come by keyword or default
    bound = {a.name: x for a, x in zip(positional, args, strict=False)}
    for name, x in kwargs.items():
        if name not in params or name in bound:
            raise TypeError(f"{schema.name}: unknown or repeated argument {name!r}")
        bound[name] = x
    for a in schema.arguments:
        if a.name not in bound:
            if not a.has_default_value():
                raise TypeError(f"{schema.name} is missing value for argument {a.name!r}")
            bound[a.name] = a.default_value
        t, x = str(a.type), bound[a.name]
        ok = {
            "Tensor": isinstance(x, torch.Tensor),
            "Optional[Tensor]": x is None or isinstance(x, torch.Tensor),
            "int": isinstance(x, int) and not isinstance(x, bool),
            "Optional[int]": x is None or (isinstance(x, int) and not isinstance(x, bool)),
            "float": isinstance(x, (int, float)) and not isinstance(x, bool),
            "Optional[float]": x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)),
            "bool": isinstance(x, bool),
        }.get(t)
        assert ok, f"{schema.name}: argument {a.name}: {type(x).__name__} for {t}"
    return bound


def _bias_problems(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> list[str]:
    b, m, nh, _ = q.shape
    a = _align(bias.dtype)
    bad = []
    if bias.dtype != q.dtype:
        bad.append(f"bias {bias.dtype} for q {q.dtype}")
    if tuple(bias.shape) != (b, nh, m, k.shape[1]):
        bad.append(f"bias {tuple(bias.shape)} vs (B, H, M, N) {(b, nh, m, k.shape[1])}")
    if bias.stride(-1) != 1:
        bad.append(f"bias stride {bias.stride()}")
    for dim, (size, stride) in enumerate(zip(bias.shape[:-1], bias.stride()[:-1], strict=True)):
        if size > 1 and stride % a:
            bad.append(f"bias stride({dim}) = {stride} is not a multiple of {a} ({bias.dtype})")
    if bias.storage_offset() % a:
        bad.append(f"bias storage offset {bias.storage_offset()}")
    return bad


def _qkv_problems(q, k, v) -> list[str]:
    bad = [f"(B, S, H, D) with unit last stride, got {tuple(x.shape)} {x.stride()}"
           for x in (q, k, v) if x.dim() != 4 or x.stride(-1) != 1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not k.dtype == v.dtype == q.dtype:
        bad.append(f"dtypes {q.dtype} {k.dtype} {v.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1] and q.shape[3] == k.shape[3]):
        bad.append(f"shapes {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    if not q.shape[2] == k.shape[2] == v.shape[2]:
        bad.append(f"equal head counts, got q {q.shape[2]}, k {k.shape[2]}")
    return bad


def _scores(c: dict) -> torch.Tensor:
    q, k, bias = c["query"], c["key"], c["bias"]
    s = torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()) * c["scale"]
    if bias is not None:
        s = s + bias.double()
    m, n = q.shape[1], k.shape[1]
    if c["custom_mask_type"]:
        shift = 0 if c["custom_mask_type"] == 1 else n - m  # 1: top-left, 2: bottom-right
        hide = torch.arange(n)[None, :] > torch.arange(m)[:, None] + shift
        s = s.masked_fill(hide, -_INF)
    return s


class EfficientOps:
    """Stands in for ``torch.ops.aten._efficient_attention_forward/_backward``: records the bound calls,
    asserts the contracts, then runs the real op (meta tensors) or an fp64 emulation (CPU tensors)."""

    def __init__(self) -> None:
        self.forwards: list[dict] = []
        self.backwards: list[dict] = []

    def forward(self, *args, **kwargs):
        c = _bind(REAL_FWD, args, kwargs)
        self.forwards.append(c)
        q, k, v, bias = c["query"], c["key"], c["value"], c["bias"]
        bad = _qkv_problems(q, k, v) + ([] if bias is None else _bias_problems(bias, q, k))
        if not (c["cu_seqlens_q"] is None and c["dropout_p"] == 0.0 and c["compute_log_sumexp"] is True):
            bad.append("dense mode, no dropout, with lse")
        if c["custom_mask_type"] not in (0, 1) or not isinstance(c["scale"], float):
            bad.append(f"custom_mask_type {c['custom_mask_type']}, scale {c['scale']}")
        assert not bad, "; ".join(bad)
        if q.device.type == "meta":
            return REAL_FWD(*args, **kwargs)
        s = _scores(c)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))  # NaN on rows that see no key: nothing guards them
        out = torch.einsum("bhmn,bnhd->bmhd", p, v.double()).to(q.dtype).contiguous()
        m = q.shape[1]
        lse_p = torch.full((q.shape[0], q.shape[2], _ceil32(m)), _INF)  # the kernel's +inf padding
        lse_p[..., :m] = lse
        z = torch.zeros((), dtype=torch.int64)
        return out, lse_p, z, z, m, k.shape[1]

    def backward(self, *args, **kwargs):
        c = _bind(REAL_BWD, args, kwargs)
        self.backwards.append(c)
        q, k, v, bias, out, do, lse = (c[n] for n in ("query", "key", "value", "bias", "out", "grad_out_", "logsumexp"))
        b, m, nh, dv = out.shape
        bad = _qkv_problems(q, k, v) + ([] if bias is None else _bias_problems(bias, q, k))
        if not (out.shape == do.shape == (*q.shape[:3], v.shape[3]) and do.dtype == out.dtype == q.dtype):
            bad.append(f"out {tuple(out.shape)} {out.dtype}, grad_out {tuple(do.shape)} {do.dtype}")
        if out.stride()[1:] != (nh * dv, dv, 1):
            bad.append(f"out strides {out.stride()}: the kernel implies row stride H*D")
        if lse.dtype != torch.float32 or tuple(lse.shape) != (b, nh, _ceil32(m)):
            bad.append(f"logsumexp {tuple(lse.shape)} {lse.dtype}: must be padded to (B, H, ceil32(M)) = {(b, nh, _ceil32(m))}")
        elif lse.stride(-1) != 1 or (b > 1 and lse.stride(0) % 8) or (nh > 1 and lse.stride(1) % 8):
            bad.append(f"logsumexp strides {lse.stride()}: check_supported wants batch/head strides % 8 == 0")
        elif lse.device.type != "meta" and not torch.isposinf(lse[..., m:]).all():
            bad.append("lse padding must be +inf")
        if lse.device.type != "meta" and torch.isneginf(lse).any():
            bad.append("an lse of -inf makes the kernel's P = exp(s + inf)")
        if not (c["bias_requires_grad"] is False and c["dropout_p"] == 0.0 and c["cu_seqlens_q"] is None):
            bad.append("no bias grad, no dropout, dense mode")
        if (c["max_seqlen_q"], c["max_seqlen_k"]) != (m, k.shape[1]) or not isinstance(c["scale"], float):
            bad.append(f"max_seqlen {c['max_seqlen_q']}, {c['max_seqlen_k']}, scale {c['scale']}")
        assert not bad, "; ".join(bad)
        if q.device.type == "meta":
            return REAL_BWD(*args, **kwargs)
        p = torch.exp(_scores(c) - lse[..., :m].double().unsqueeze(-1))
        g, o, kk, vv = do.double(), out.double(), k.double(), v.double()
        delta = (g * o).sum(-1).transpose(1, 2)  # (B, H, M)
        ds = p * (torch.einsum("bmhd,bnhd->bhmn", g, vv) - delta.unsqueeze(-1))
        dq = torch.einsum("bhmn,bnhd->bmhd", ds, kk) * c["scale"]
        dk = torch.einsum("bhmn,bmhd->bnhd", ds, q.double()) * c["scale"]
        dvv = torch.einsum("bhmn,bmhd->bnhd", p, g)
        return dq.to(q.dtype), dk.to(q.dtype), dvv.to(q.dtype), torch.empty(0)


def _faithful_backward_meta(grad_out_, query, key, value, bias, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, logsumexp, dropout_p, philox_seed, philox_offset, custom_mask_type,
                            bias_requires_grad, scale=None, num_splits_key=None, window_size=None,
                            shared_storage_dqdkdv=False):
    """Shape kernel with the argument list of the schema and the checks of attention_backward.cu."""
    torch._check(query.dim() == key.dim() == value.dim() == grad_out_.dim() == 4)
    torch._check(query.size(0) == key.size(0) == value.size(0) == grad_out_.size(0))
    torch._check(key.size(1) == value.size(1) and query.size(1) == grad_out_.size(1))
    torch._check(query.size(2) == key.size(2) == value.size(2) == grad_out_.size(2))
    torch._check(query.size(3) == key.size(3) and value.size(3) == grad_out_.size(3))
    if bias is not None:
        torch._check(tuple(bias.shape) == (query.size(0), query.size(2), query.size(1), key.size(1)))
    grad_bias = torch.empty(0, dtype=query.dtype, device=query.device)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), grad_bias


@pytest.fixture(scope="module")
def _backward_meta():
    """Register :func:`_faithful_backward_meta` while this module runs if torch's own is the broken one."""
    x = torch.empty(1, 8, 1, 8, device="meta", dtype=torch.float16)
    lse = torch.empty(1, 1, 32, device="meta")
    z = torch.empty((), dtype=torch.int64, device="meta")
    try:
        REAL_BWD(x, x, x, x, None, x, None, None, 8, 8, lse, 0.0, z, z, 0, False, scale=0.5)
        yield
        return
    except TypeError:  # "meta__efficient_attention_backward() got multiple values for argument 'scale'"
        pass
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        lib.impl("_efficient_attention_backward", _faithful_backward_meta, "Meta")
    yield
    lib._destroy()


@pytest.fixture
def ops(monkeypatch, _backward_meta) -> EfficientOps:
    spy = EfficientOps()
    monkeypatch.setattr(torch.ops.aten, "_efficient_attention_forward", spy.forward)
    monkeypatch.setattr(torch.ops.aten, "_efficient_attention_backward", spy.backward)
    return spy


@pytest.fixture
def stand_in(monkeypatch):
    """Factory: the CPU stand-in ``flash_attn`` package reporting ``version``."""

    def purge():
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]

    def load(version: str):
        purge()
        monkeypatch.setenv("RINGRT_STAND_IN_FLASH_VERSION", version)
        monkeypatch.syspath_prepend(str(STAND_IN))
        pkg = importlib.import_module("flash_attn")
        importlib.import_module("flash_attn.flash_attn_interface")
        return pkg

    yield load
    purge()


# ----------------------------------------------------------------------------------------------
# Inputs and the fp64 reference
# ----------------------------------------------------------------------------------------------


def _inputs(h, kvh, sq, sk, dtype, device="cpu", d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, n, s, d, generator=g) for n, s in ((h, sq), (kvh, sk), (kvh, sk), (h, sq)))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, dout))


def _mask(kind: str | None, sq: int, sk: int, dtype, device="cpu", h=H):
    """None, "2d" (Sq, Sk), "4d-heads" (1, H, Sq, Sk) or "4d-batch" (B, 1, Sq, Sk) additive masks with
    rows that see no key and partially hidden rows."""
    if kind is None:
        return None
    shape = {"2d": (sq, sk), "4d-heads": (1, h, sq, sk), "4d-batch": (B, 1, sq, sk)}[kind]
    g = torch.Generator().manual_seed(sq * sk)
    m = torch.randn(shape, generator=g)
    m = m.masked_fill(torch.rand(shape, generator=g) < 0.3, -_INF)
    m[..., 3, :] = -_INF  # query 3 sees nothing
    m[..., 5, 1:] = -_INF  # query 5 sees key 0 only
    if kind != "2d":
        m[..., 0, 7, :] = -_INF  # a row empty in one head/batch entry only
    return m.to(device=device, dtype=dtype)


def _reference(q, k, v, *, causal, mask, scale, dtype):
    """The contract from its definition, in ``dtype``: top-left causal, additive mask, GQA by repeat,
    rows that see no key give out = 0 and lse = -inf (and no gradient)."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, ke.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(dtype)
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(), -_INF)
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return torch.matmul(p, ve), torch.logsumexp(s, -1)


def _ref_with_grads(q, k, v, dout, *, causal, mask, scale, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = _reference(*leaves, causal=causal, mask=mask, scale=scale, dtype=dtype)
    grads = torch.autograd.grad((out * dout.to(dtype)).sum(), leaves)
    return out.detach(), lse.detach(), grads


def _assert_measured(got, ref64, lowp, what: str) -> None:
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref64)), f"{what}: -inf entries differ"
    fin = torch.isfinite(ref64)
    err = (got.double() - ref64)[fin].abs().max()
    err_lowp = (lowp.double() - ref64)[fin].abs().max()
    tol = 2 * err_lowp + torch.finfo(got.dtype).eps * ref64[fin].abs().max()
    assert err <= tol, f"{what}: error {err:.3g} > 2 x {err_lowp:.3g} + 1 ulp = {tol:.3g}"


def _check_against_reference(kern, q, k, v, dout, *, causal, mask, dtype):
    """Forward and backward of ``kern`` (FINAL lse and delta of the block) against fp64."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    ref = _ref_with_grads(q, k, v, dout, causal=causal, mask=mask, scale=scale, dtype=torch.float64)
    low = _ref_with_grads(q, k, v, dout, causal=causal, mask=mask, scale=scale, dtype=dtype)
    out, lse = kern.forward(q, k, v, causal=causal, mask=mask, scale=scale)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert out.dtype == q.dtype and lse.dtype == lse_dtype and lse.shape == q.shape[:3]
    _assert_measured(out, ref[0], low[0], "out")
    _assert_measured(lse, ref[1], low[1], "lse")
    delta = (dout.double() * ref[0]).sum(-1).float()
    grads = kern.backward(dout, q, k, v, ref[1].float(), delta, causal=causal, mask=mask, scale=scale)
    for name, gd, r, lo in zip(("dq", "dk", "dv"), grads, ref[2], low[2], strict=True):
        assert gd.dtype == q.dtype
        _assert_measured(gd, r, lo, name)


def _kernel(flash=None, capability=(8, 0)) -> CudaKernel:
    return CudaKernel(flash=flash, capability=capability)


# ----------------------------------------------------------------------------------------------
# The route (pure)
# ----------------------------------------------------------------------------------------------

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.mark.parametrize("dtype,head_dim,sq,sk,causal,masked,version,cap,path,warn", [
    (F16, 64, 128, 128, True, False, "2.6.3", (8, 0), "flash", False),
    (BF16, 128, 37, 511, False, False, "2.7.4.post1", (9, 0), "flash", False),
    (F16, 72, 64, 64, False, False, "2.8.3", (8, 6), "flash", False),
    (F16, 256, 64, 64, True, False, "2.8.3", (9, 0), "flash", False),
    (F16, 100, 64, 64, False, False, "2.8.3", (8, 0), "efficient", True),  # not a multiple of 8
    (F16, 320, 64, 64, False, False, "2.8.3", (8, 0), "efficient", True),  # over 256
    (F16, 64, 64, 64, False, False, "2.8.3", (7, 5), "efficient", True),  # flash needs sm80
    (F16, 64, 64, 64, False, False, "2.8.3", (10, 0), "flash", False),  # any sm80+ from 2.7.3
    (F16, 64, 64, 64, False, False, "2.7.2.post1", (10, 0), "efficient", True),  # sm8x/sm90 only before
    (F16, 64, 64, 64, False, False, "2.6.3", (12, 0), "efficient", True),
    (F16, 64, 64, 64, False, False, "3.0.0b1", (9, 0), "efficient", True),  # other package generation
    (F16, 64, 64, 64, False, False, "2.5.9.post1", (9, 0), "efficient", True),  # older convention
    (F16, 64, 64, 64, False, False, None, (9, 0), "efficient", False),  # not installed
    (F32, 64, 64, 64, False, False, "2.8.3", (9, 0), "efficient", False),  # flash has no fp32
    (F16, 64, 64, 64, False, True, "2.8.3", (9, 0), "efficient", False),  # explicit mask
    (F16, 64, 37, 64, True, False, "2.8.3", (9, 0), "efficient", False),  # causal, Sq != Sk
    (F16, 64, 64, 37, True, False, "2.6.3", (9, 0), "efficient", False),
    (F16, 64, 37, 64, False, False, "2.6.3", (9, 0), "flash", False),  # non-causal: any shape
    (F64, 64, 64, 64, False, False, "2.8.3", (9, 0), "math", True),
    (F64, 64, 64, 64, False, False, None, (8, 0), "math", True),
    (BF16, 64, 64, 64, False, False, None, (7, 5), "math", True),  # no bf16 efficient kernel before sm80
    (F16, 64, 64, 64, False, False, None, (7, 5), "efficient", False),
])
def test_route_table(dtype, head_dim, sq, sk, causal, masked, version, cap, path, warn):
    from ringrt.ops.kernels_cuda import choose_cuda_path

    r = choose_cuda_path(dtype=dtype, head_dim=head_dim, sq=sq, sk=sk, causal=causal, masked=masked,
                         flash_version=version, capability=cap)
    assert (r.path, r.warn) == (path, warn)
    assert (r.why == "") == (path == "flash")


# ----------------------------------------------------------------------------------------------
# aten's efficient kernel: schemas on meta, contracts, numerics through the emulation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,kvh", HEADS)
@pytest.mark.parametrize("mask_kind", [None, "2d", "4d-heads", "4d-batch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_meta_calls_pass_the_real_op_schemas(ops, dtype, causal, mask_kind, h, kvh):
    """Sq = 37, Sk = 511: neither a multiple of 8 nor of 32. Every call binds to the installed schema
    (``bias_requires_grad`` included), meets the layout contracts, and runs aten's shape kernels."""
    sq, sk = 37, 511
    q, k, v, dout = _inputs(h, kvh, sq, sk, dtype, device="meta")
    mask = _mask(mask_kind, sq, sk, dtype, device="meta", h=h)
    kern = _kernel()
    out, lse = kern.forward(q, k, v, causal=causal, mask=mask, scale=0.125)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, dtype, q.shape[:3], F32)
    delta = torch.empty(B, h, sq, device="meta")
    dq, dk, dv = kern.backward(dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    assert len(ops.forwards) == len(ops.backwards) == 1


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("h,kvh,causal", [(4, 4, False), (4, 2, False), (4, 1, True)])
def test_bias_handed_to_the_kernel_is_aligned_with_its_logical_shape(ops, dtype, h, kvh, causal):
    """A Λ tile 511 keys wide: the bias the kernel gets has row stride a multiple of 16 bytes while
    its logical shape stays (B, heads, rows, 511) (``_bias_problems`` in the captured calls)."""
    sq, sk = 37, 511
    q, k, v, dout = _inputs(h, kvh, sq, sk, dtype, device="meta")
    kern = _kernel()
    mask = _mask("2d", sq, sk, dtype, device="meta")
    out, lse = kern.forward(q, k, v, causal=causal, mask=mask, scale=0.125)
    kern.backward(dout, q, k, v, lse, torch.empty(B, h, sq, device="meta"), causal=causal, mask=mask, scale=0.125)
    for c in ops.forwards + ops.backwards:
        bias = c["bias"]
        assert bias.shape[-1] == sk and bias.stride(-2) % _align(dtype) == 0 and bias.stride(-2) >= sk


def test_lse_handed_to_the_backward_is_padded_with_inf(ops):
    """Sq = 37: the backward gets (B, H, 64) with +inf in rows 37..63 and for rows that saw no key."""
    sq, sk = 37, 61
    q, k, v, dout = _inputs(4, 4, sq, sk, F16)
    kern = _kernel()
    for mask in (None, _mask("2d", sq, sk, F16)):
        out, lse = kern.forward(q, k, v, causal=False, mask=mask, scale=0.125)
        kern.backward(dout, q, k, v, lse, (dout.float() * out.float()).sum(-1), causal=False, mask=mask, scale=0.125)
        handed = ops.backwards[-1]["logsumexp"]
        assert handed.shape == (B, 4, 64) and torch.isposinf(handed[..., sq:]).all()
        assert torch.equal(handed[..., :3], lse[..., :3])
    assert torch.isneginf(lse[:, :, 3]).all() and torch.isposinf(handed[:, :, 3]).all()  # the row that saw no key


@pytest.mark.parametrize("h,kvh,causal", [(4, 4, False), (4, 2, False), (4, 2, True)])
def test_out_handed_to_the_backward_is_dense_bshd(ops, h, kvh, causal):
    """The backward reads ``out`` with row stride H*D implied; a transposed (B, H, S, D) tensor would be
    read at the wrong addresses. Also when the caller passes its own (B, H, S, D) out rows."""
    q, k, v, dout = _inputs(h, kvh, 37, 61, F16)
    kern = _kernel()
    out, lse = kern.forward(q, k, v, causal=causal, mask=None, scale=0.125)
    delta = (dout.float() * out.float()).sum(-1)
    kern.backward(dout, q, k, v, lse, delta, causal=causal, mask=None, scale=0.125)
    kern.backward(dout, q, k, v, lse, delta, causal=causal, mask=None, scale=0.125, out=out.contiguous())
    assert len(ops.backwards) == 2  # each checked by EfficientOps.backward


@pytest.mark.parametrize("mask_kind", [None, "2d", "4d-heads", "4d-batch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,kvh", HEADS)
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_efficient_path_matches_fp64_reference(ops, dtype, h, kvh, causal, mask_kind):
    q, k, v, dout = _inputs(h, kvh, 37, 61, dtype)
    mask = _mask(mask_kind, 37, 61, dtype, h=h)
    _check_against_reference(_kernel(), q, k, v, dout, causal=causal, mask=mask, dtype=dtype)
    assert len(ops.forwards) == len(ops.backwards) == 1


def test_fp32_mask_for_fp16_queries_is_converted_once(ops):
    q, k, v, dout = _inputs(4, 2, 37, 61, F16)
    mask = _mask("2d", 37, 61, F32)
    _check_against_reference(_kernel(), q, k, v, dout, causal=False, mask=mask, dtype=F16)


@pytest.mark.parametrize("h,kvh", [(4, 2), (4, 1)])
def test_noncausal_gqa_hands_kv_to_the_kernel_without_copies(ops, h, kvh):
    """Non-causal GQA folds the query group into rows: the kernel gets K/V with H_kv heads, as views of
    the caller's tensors, and contiguous queries are folded without a copy."""
    q, k, v, dout = _inputs(h, kvh, 37, 61, F16)
    kern = _kernel()

    def no_copies(c):
        assert c["key"].shape[2] == c["value"].shape[2] == kvh, f"K/V handed with {c['key'].shape[2]} heads"
        assert c["query"].shape[1] == (h // kvh) * 37
        for name, x in (("key", k), ("value", v), ("query", q)):
            assert c[name].untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), f"{name} was copied"

    out, lse = kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
    no_copies(ops.forwards[-1])
    kern.forward(q, k, v, causal=False, mask=_mask("2d", 37, 61, F16), scale=0.125)
    no_copies(ops.forwards[-1])
    kern.backward(dout, q, k, v, lse, (dout.float() * out.float()).sum(-1), causal=False, mask=None, scale=0.125)
    no_copies(ops.backwards[-1])


def test_masked_path_never_syncs_the_host(_backward_meta):
    """Reading a meta tensor's value raises (``bool()``/``.item()``), as a CUDA sync would stall the
    stream: forward and backward of masked blocks with rows that see no key, through aten's real ops
    on meta tensors, must not need one."""
    q, k, v, dout = _inputs(4, 2, 37, 511, F16, device="meta")
    kern = _kernel()
    for kind in ("2d", "4d-heads"):
        mask = _mask(kind, 37, 511, F16, device="meta")
        out, lse = kern.forward(q, k, v, causal=False, mask=mask, scale=0.125)
        kern.backward(dout, q, k, v, lse, torch.empty(B, 4, 37, device="meta"), causal=False, mask=mask, scale=0.125)


def test_float64_runs_the_math_kernel(stand_in):
    """Neither aten's efficient kernel nor flash-attn has float64: the math kernel runs it."""
    q, k, v, dout = _inputs(4, 2, 37, 61, F64)
    kern = _kernel(flash=stand_in("2.8.3"), capability=(9, 0))
    mask = _mask("2d", 37, 61, F64)
    out, lse = kern.forward(q, k, v, causal=True, mask=mask, scale=0.125)
    ref = MathKernel().forward(q, k, v, causal=True, mask=mask, scale=0.125)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1]) and lse.dtype == F64
    r_out, r_lse, r_grads = _ref_with_grads(q, k, v, dout, causal=True, mask=mask, scale=0.125, dtype=F64)
    torch.testing.assert_close((out, lse), (r_out, r_lse), atol=1e-12, rtol=0)  # fp64 throughout
    grads = kern.backward(dout, q, k, v, lse, (dout * out).sum(-1), causal=True, mask=mask, scale=0.125)
    torch.testing.assert_close(grads, r_grads, atol=1e-12, rtol=0)


def test_get_kernel_still_refuses_cuda_for_other_devices():
    for dev in ("cpu", "meta"):
        with pytest.raises(ValueError, match="kernel='cuda' needs CUDA tensors"):
            get_kernel(torch.device(dev), "cuda")


# ----------------------------------------------------------------------------------------------
# flash-attn through the CPU stand-in
# ----------------------------------------------------------------------------------------------

VERSIONS = ["2.6.3", "2.7.4.post1", "2.8.3"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,kvh", HEADS)
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("version", VERSIONS)
def test_flash_adapter_matches_fp64_reference(stand_in, ops, version, dtype, h, kvh, causal):
    pkg = stand_in(version)
    q, k, v, dout = _inputs(h, kvh, 48, 48, dtype)
    _check_against_reference(_kernel(flash=pkg), q, k, v, dout, causal=causal, mask=None, dtype=dtype)
    calls = sys.modules["flash_attn.flash_attn_interface"].CALLS
    assert [name for name, _ in calls] == ["forward", "backward"] and not ops.forwards
    assert calls[0][1]["k"].shape[2] == kvh  # GQA natively, no repeated K/V


@pytest.mark.parametrize("version", VERSIONS)
def test_flash_backward_hands_views_not_copies(stand_in, version):
    """flash needs only stride(-1) == 1: (B, H, S, D) tensors go in as transposed views."""
    pkg = stand_in(version)
    q, k, v, dout = _inputs(4, 2, 48, 48, F16)
    kern = _kernel(flash=pkg)
    out, lse = kern.forward(q, k, v, causal=True, mask=None, scale=0.125)
    out = out.contiguous()
    kern.backward(dout, q, k, v, lse, (dout.float() * out.float()).sum(-1), causal=True, mask=None, scale=0.125, out=out)
    _, args = sys.modules["flash_attn.flash_attn_interface"].CALLS[-1]
    for name, x in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out)):
        assert args[name].untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), f"{name} was copied"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sq,sk,masked", [(37, 48, False), (48, 37, False), (48, 48, True)])
def test_flash_is_not_asked_where_its_semantics_differ(stand_in, ops, version, sq, sk, masked):
    """Causal with Sq != Sk (flash: bottom-right, contract: top-left) and masked blocks run aten's
    efficient kernel and still meet the contract."""
    pkg = stand_in(version)
    q, k, v, dout = _inputs(4, 2, sq, sk, F16)
    mask = _mask("2d", sq, sk, F16) if masked else None
    _check_against_reference(_kernel(flash=pkg), q, k, v, dout, causal=True, mask=mask, dtype=F16)
    assert not sys.modules["flash_attn.flash_attn_interface"].CALLS
    assert len(ops.forwards) == len(ops.backwards) == 1


@pytest.mark.parametrize("version,head_dim,cap,reason", [
    ("3.0.0b1", 64, (9, 0), "flash-attn 3.0.0b1 is outside the supported"),
    ("2.5.9.post1", 64, (9, 0), "flash-attn 2.5.9.post1 is outside the supported"),
    ("2.8.3", 100, (9, 0), "head_dim a multiple of 8 up to 256, got 100"),
    ("2.8.3", 64, (7, 5), "flash-attn 2.8.3 does not run on sm75"),
    ("2.6.3", 64, (10, 0), "flash-attn 2.6.3 does not run on sm100"),
])
def test_unusable_flash_falls_back_with_one_warning(stand_in, ops, caplog, version, head_dim, cap, reason):
    pkg = stand_in(version)
    q, k, v, dout = _inputs(4, 2, 48, 48, F16, d=head_dim)
    kern = _kernel(flash=pkg, capability=cap)
    with caplog.at_level(logging.WARNING, logger="ringrt.ops.kernels_cuda"):
        _check_against_reference(kern, q, k, v, dout, causal=True, mask=None, dtype=F16)
        kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
    assert not sys.modules["flash_attn.flash_attn_interface"].CALLS and len(ops.forwards) == 2
    hits = [r for r in caplog.records if reason in r.getMessage()]
    assert len(hits) <= 1 and (hits or reason in _already_warned()), caplog.text


def _already_warned() -> str:
    from ringrt.ops import kernels_cuda

    return " | ".join(kernels_cuda._warned)
