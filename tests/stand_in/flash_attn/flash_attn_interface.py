"""CPU stand-in for ``flash_attn.flash_attn_interface._flash_attn_forward/_flash_attn_backward``.

The two functions have the exact signature of the installed version's family (read from the tagged
sources of Dao-AILab/flash-attention):

* 2.6.x: ``window_size=(l, r)``; forward returns (out, q, k, v, out_padded, softmax_lse, S_dmask,
  rng_state); backward returns (dq, dk, dv, softmax_d) and fills the given dq/dk/dv.
* 2.7.x / 2.8.x: ``window_size_left=``, ``window_size_right=``; forward returns (out, softmax_lse,
  S_dmask, rng_state); backward fills dq/dk/dv and returns softmax_d.

They make the checks of flash-attn's C++ ``mha_fwd``/``mha_bwd`` (dtype fp16/bf16, (B, S, H, D) with
stride(-1) == 1, H a multiple of H_kv, head_dim a multiple of 8 up to 256, lse (B, H, Sq) fp32 dense,
gradient buffers of the right shape) plus the features ringrt must leave off (dropout, window, softcap,
alibi), and compute real attention in fp64 with flash's own semantics: causal aligned BOTTOM-RIGHT
(query i sees keys j <= i + Sk - Sq), a row that sees no key gets lse = +inf and out = 0. ``CALLS``
records every call for the tests.
"""

from __future__ import annotations

import torch

from flash_attn import __version__

CALLS: list[tuple[str, dict]] = []


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"flash_attn stand-in: {msg}")


def _check_inputs(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(x, torch.Tensor) and x.dim() == 4, f"{name} must be a 4-D (B, S, H, D) tensor")
        _check(x.dtype in (torch.float16, torch.bfloat16), f"{name} dtype {x.dtype}: only fp16/bf16")
        _check(x.stride(-1) == 1, f"{name} must have contiguous last dimension")
    b, sq, h, d = q.shape
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v must share a dtype")
    _check(k.shape == v.shape and k.shape[0] == b and k.shape[3] == d, f"k {tuple(k.shape)} / v {tuple(v.shape)} vs q {tuple(q.shape)}")
    _check(h % k.shape[2] == 0, "Number of heads in key/value must divide number of heads in query")
    _check(d % 8 == 0 and d <= 256, f"head_dim {d}: a multiple of 8 up to 256")
    _check(dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None, "dropout/softcap/alibi must be off")
    _check(tuple(window) == (-1, -1), f"window {window} must be (-1, -1)")
    _check(isinstance(causal, bool) and isinstance(softmax_scale, float), "causal bool, softmax_scale float")


def _probs(q, k, scale: float, causal: bool, lse: torch.Tensor | None = None):
    """-> scores s (B, H, Sq, Sk) fp64 and lse (B, H, Sq) with +inf for rows that see no key."""
    h, kvh = q.shape[2], k.shape[2]
    ke = k.double().repeat_interleave(h // kvh, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), ke) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal and sq > 1:  # C++: causal is dropped for seqlen_q == 1
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(sk).unsqueeze(0)
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))  # bottom-right aligned
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    return s, torch.exp(s - lse.double().unsqueeze(-1)), lse  # exp(-inf - inf) = 0 for empty rows


def _forward(q, k, v, scale, causal):
    s, p, lse = _probs(q, k, scale, causal)
    ve = v.double().repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", p, ve).to(q.dtype).contiguous()
    return out, lse.float().contiguous()


def _backward(dout, q, k, v, out, lse, dq, dk, dv, scale, causal):
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    for name, x, shape in (("dout", dout, q.shape), ("out", out, q.shape)):
        _check(x.shape == shape and x.dtype == q.dtype and x.stride(-1) == 1, f"{name} {tuple(x.shape)} {x.dtype}")
    _check(lse.shape == (b, h, sq) and lse.dtype == torch.float32 and lse.is_contiguous(), f"softmax_lse {tuple(lse.shape)} {lse.dtype} must be dense (B, H, Sq) fp32")
    for name, x, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, k.shape)):
        _check(isinstance(x, torch.Tensor) and x.shape == shape and x.dtype == q.dtype and x.stride(-1) == 1, f"{name} buffer")
    _, p, _ = _probs(q, k, scale, causal, lse)
    g = h // kvh
    ke = k.double().repeat_interleave(g, dim=2)
    ve = v.double().repeat_interleave(g, dim=2)
    do = dout.double()
    delta = (do * out.double()).sum(-1).transpose(1, 2)  # (B, H, Sq): flash's softmax_d
    dvf = torch.einsum("bhqk,bqhd->bkhd", p, do)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, ve) - delta.unsqueeze(-1))
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", ds, ke) * scale)
    dkf = torch.einsum("bhqk,bqhd->bkhd", ds, q.double()) * scale
    dk.copy_(dkf.view(b, sk, kvh, g, d).sum(3))
    dv.copy_(dvf.view(b, sk, kvh, g, d).sum(3))
    return delta.float()


if __version__.startswith("2.6."):

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
        CALLS.append(("forward", dict(q=q, k=k, v=v, causal=causal, window_size=window_size)))
        _check_inputs(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
        _check(return_softmax is False, "return_softmax must be False")
        out, lse = _forward(q, k, v, softmax_scale, causal)
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, rng_state=None):
        CALLS.append(("backward", dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, causal=causal)))
        _check_inputs(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
        _check(isinstance(deterministic, bool), "deterministic must be a bool")
        d = _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
        return dq, dk, dv, d

else:

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                            alibi_slopes, return_softmax):
        CALLS.append(("forward", dict(q=q, k=k, v=v, causal=causal)))
        _check_inputs(q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right), softcap, alibi_slopes)
        _check(return_softmax is False, "return_softmax must be False")
        out, lse = _forward(q, k, v, softmax_scale, causal)
        return out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
        CALLS.append(("backward", dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, causal=causal)))
        _check_inputs(q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right), softcap, alibi_slopes)
        _check(isinstance(deterministic, bool), "deterministic must be a bool")
        return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
