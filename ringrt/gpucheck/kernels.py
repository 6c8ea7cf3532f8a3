"""Every block-kernel path on one device against the references of ``reference.py``.

Each case runs the kernel ``ringrt.ops.kernels.get_kernel(device)`` picks (on CUDA: flash-attn where its
gates allow, else aten's efficient attention, fp64 on the math kernel) forward and backward, exactly
as the ring schedules call it: the backward gets the forward's final lse and delta = rowsum(dout *
out). Output, lse and dq/dk/dv are compared with the fp64 reference; the tolerance of each is twice
the error of the same computation done plainly in the kernel's precision, plus a floor of two units
of roundoff of that precision times the reference's magnitude. Rows that see no key must come back
exactly as the contract says: out 0, lse -inf, no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops.kernels import get_kernel
from .reference import attend


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    head_dim: int
    causal: bool
    mask: str | None = None
    """None, ``"band"`` (a Λ-mask tile: 4 global keys + a local window) or ``"band_empty"`` (the
    same with its first 5 rows seeing nothing)."""


def cases(quick: bool) -> list[Case]:
    """The shapes checked: odd lengths (not multiples of 8 or 32), GQA/MQA, head dims 64/72/128,
    a 37 x 511 Λ tile, a mask with empty rows."""
    if quick:
        return [
            Case("causal, odd length", 1, 4, 4, 100, 100, 32, True),
            Case("cross, MQA", 1, 4, 1, 24, 72, 32, False),
            Case("Λ tile 37x511, GQA", 1, 4, 2, 37, 511, 32, False, "band"),
            Case("mask with empty rows", 1, 2, 2, 20, 45, 16, False, "band_empty"),
        ]
    return [
        Case("causal, S=1000", 1, 8, 8, 1000, 1000, 64, True),
        Case("causal GQA 8/2, D=128", 2, 8, 2, 256, 256, 128, True),
        Case("cross MQA 8/1, 96x320", 1, 8, 1, 96, 320, 64, False),
        Case("causal, D=72 (flash gate)", 1, 4, 4, 200, 200, 72, True),
        Case("Λ tile 37x511, GQA 8/2", 1, 8, 2, 37, 511, 64, False, "band"),
        Case("Λ tile 512x767", 1, 4, 4, 512, 767, 64, False, "band"),
        Case("mask with empty rows", 2, 4, 4, 64, 300, 64, False, "band_empty"),
    ]


def _mask(case: Case, device) -> torch.Tensor | None:
    if case.mask is None:
        return None
    i = torch.arange(case.sq, device=device).unsqueeze(1) + (case.sk - case.sq)  # query positions (bottom-aligned)
    j = torch.arange(case.sk, device=device).unsqueeze(0)
    window = max(2, case.sk // 3)
    keep = ((i - j >= 0) & (i - j < window)) | (j < 4)
    if case.mask == "band_empty":
        keep[:5] = False
    return torch.zeros(case.sq, case.sk, dtype=torch.float32, device=device).masked_fill(~keep, float("-inf"))


def path_of(kernel, q, k, *, causal: bool, mask) -> str:
    """Which implementation ``kernel`` runs for this block: flash / efficient / math on CUDA, else its name."""
    route = getattr(kernel, "route", None)
    return route(q, k, causal=causal, mask=mask).path if route is not None else kernel.name


def roundoff_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Two units of roundoff of ``dtype`` at the magnitude of ``ref``'s finite entries (at least 1)."""
    finite = ref[torch.isfinite(ref)]
    mag = finite.abs().max().item() if finite.numel() else 1.0
    return 2 * torch.finfo(dtype).eps * max(1.0, mag)


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    return (x.double()[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def check_case(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """One case in one dtype: errors, tolerances and the verdict, as a JSON-able dict."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, hk, sq, sk, d = case.batch, case.heads, case.kv_heads, case.sq, case.sk, case.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v, dout = rnd(b, h, sq, d), rnd(b, hk, sk, d), rnd(b, hk, sk, d), rnd(b, h, sq, d)
    mask = _mask(case, device)
    scale = 1.0 / math.sqrt(d)
    kernel = get_kernel(device)

    out, lse = kernel.forward(q, k, v, causal=case.causal, mask=mask, scale=scale)
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    dq, dk, dv = kernel.backward(dout, q, k, v, lse, delta, causal=case.causal, mask=mask, scale=scale, out=out)
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}

    refs = {}
    for upcast in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, l_ = attend(*leaves, causal=case.causal, mask=mask, scale=scale, upcast=upcast)
        o.backward(dout.to(o.dtype))
        refs[upcast] = {"out": o.detach(), "lse": l_.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}

    errors, tolerances = {}, {}
    for name, x in got.items():
        ref = refs[True][name].double()
        errors[name] = _err(x, ref)
        tolerances[name] = 2 * _err(refs[False][name], ref) + roundoff_floor(dtype if name != "lse" else torch.float32, ref)
    empty_ok = True
    if mask is not None:
        empty = torch.isneginf(mask).all(-1)
        if empty.any():
            empty_ok = bool(torch.isneginf(lse[..., empty]).all()) and bool((out[..., empty, :] == 0).all()) \
                and bool((dq[..., empty, :] == 0).all())
    ok = empty_ok and all(math.isfinite(errors[n]) and errors[n] <= tolerances[n] for n in errors)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "kernel": kernel.name,
            "path": path_of(kernel, q, k, causal=case.causal, mask=mask), "ok": ok, "empty_rows_ok": empty_ok,
            "max_abs_err": errors, "tolerance": tolerances}


def check_kernels(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> list[dict]:
    """Every case in every dtype (fp64 too: on CUDA it must route to the math kernel)."""
    return [check_case(c, dt, device, seed=i) for i, c in enumerate(cases(quick)) for dt in dtypes]
