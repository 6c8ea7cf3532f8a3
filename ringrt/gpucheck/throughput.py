"""The block kernel's FLOP/s, and what fraction of the device's peak that is.

FLOPs are counted the way FlashAttention reports them: forward 4·B·H·Sq·Sk·D (two matmuls), halved
under causal masking; backward 2.5× the forward (five matmuls to the forward's two). The time is
the best of several runs with the device's queue drained around each (``ringrt.ops.timing``).
Peaks are the vendors' dense fp16/bf16 tensor-core figures; an unknown device gets no fraction.
"""

from __future__ import annotations

import math

import torch

from ..ops.timing import best_of
from ..ops.kernels import get_kernel
from .kernels import path_of

# Substrings of torch.cuda.get_device_name() -> dense bf16/fp16 tensor TFLOP/s (datasheets, no sparsity),
# most specific first.
PEAK_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIE", 756.0), ("H100", 989.0), ("H800 PCIE", 756.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0),
    ("L4", 121.0), ("A6000", 155.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense fp16/bf16 tensor-core peak of the named GPU in TFLOP/s, or None if unknown."""
    name = device_name.upper().replace("-", " ")
    for needle, peak in PEAK_TFLOPS:
        if needle in name:
            return peak
    return None


def attention_flops(batch: int, heads: int, sq: int, sk: int, head_dim: int, causal: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs of one attention call."""
    fwd = 4.0 * batch * heads * sq * sk * head_dim * (0.5 if causal else 1.0)
    return fwd, 2.5 * fwd


def measure(device: torch.device, dtype: torch.dtype, *, batch: int, heads: int, seq: int, head_dim: int,
            causal: bool = True, reps: int = 5) -> dict:
    """Forward and backward TFLOP/s of the kernel on one causal self-attention block."""
    kernel = get_kernel(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(batch, heads, seq, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = kernel.forward(q, k, v, causal=causal, mask=None, scale=scale)
    delta = (dout.float() * out.float()).sum(-1)
    t_fwd = best_of(lambda: kernel.forward(q, k, v, causal=causal, mask=None, scale=scale), device, reps=reps)
    t_bwd = best_of(lambda: kernel.backward(dout, q, k, v, lse, delta, causal=causal, mask=None, scale=scale, out=out),
                    device, reps=reps)
    f_fwd, f_bwd = attention_flops(batch, heads, seq, seq, head_dim, causal)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name) if device.type == "cuda" else None
    fwd_tf, bwd_tf = f_fwd / t_fwd / 1e12, f_bwd / t_bwd / 1e12
    total_tf = (f_fwd + f_bwd) / (t_fwd + t_bwd) / 1e12
    return {
        "device": name, "dtype": str(dtype).replace("torch.", ""), "kernel": kernel.name,
        "path": path_of(kernel, q, k, causal=causal, mask=None),
        "shape": {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "causal": causal},
        "fwd_s": t_fwd, "bwd_s": t_bwd, "fwd_tflops": fwd_tf, "bwd_tflops": bwd_tf, "fwd_bwd_tflops": total_tf,
        "peak_tflops": peak, "fraction_of_peak": (total_tf / peak) if peak else None,
    }
