"""Memory layouts that aten's CUDA efficient-attention kernel requires of what it is handed. Pure torch.

``torch.ops.aten._efficient_attention_forward/_backward`` take (B, S, H, D) tensors ("BMHK") with the
same head count for q and k/v, an optional additive bias (B, H, Sq, Sk), and for the backward the
log-sum-exp the forward produced. Three rules the meta (shape) kernels do not check, but the CUDA
kernels rely on:

* **Bias alignment.** The kernel picked for 16-byte-aligned q/k/v loads the bias in 16-byte vectors and
  its ``check_supported`` rejects a bias whose batch, head or row stride is not a multiple of 16 bytes
  (8 elements for fp16/bf16, 4 for fp32) or whose data pointer is not aligned. A (Sq, 511) mask fails.
  SDPA pads the bias (``preprocess_mask`` -> ``pad_bias``) and slices it back to Sk: the logical shape
  stays (.., Sk) while the row stride becomes a multiple of the alignment. :func:`pack_bias` does the same
  and keeps broadcast (stride-0) dimensions broadcast.
* **LSE padding.** The forward returns lse (B, H, ceil(Sq/32)*32) whose tail is +inf, and the sm80
  backward reads whole 32-row blocks of it without a row guard (its ``check_supported`` also wants the
  batch and head strides multiples of 8). A (B, H, Sq) lse handed back unpadded makes it read the next
  head's values. :func:`pad_lse` rebuilds the padded form, with +inf both in the
  padding and for rows that saw no key (lse = -inf in ringrt's contract): P = exp(s - inf) = 0.
* **Output layout.** The backward reads ``out`` with the row stride H*D implied (only the batch and head
  strides are taken from the tensor): it must be (B, S, H, D) with its last three dims contiguous.

GQA without copying K/V: the kernel wants equal head counts, but a non-causal block can fold the g query
heads that share a K/V head into the row dimension instead of repeating K/V g times::

    q (B, Hkv*g, Sq, D)  ->  (B, g*Sq, Hkv, D)      row j*Sq + i of K/V head h = query i of head h*g + j

(:func:`fold_rows`, a view when q's strides allow it). Exact: every row still sees the same keys;
the bias is folded alike and the outputs are unfolded with :func:`unfold_rows`.
"""

from __future__ import annotations

import torch

LSE_ROWS = 32  # the backward's query block (``kAlignLSE``)
_BIAS_BYTES = 16  # one 128-bit vector load


def bias_alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: 8 for fp16/bf16, 4 for fp32 (what the aligned kernels require of every bias
    stride but the last)."""
    return max(1, _BIAS_BYTES // dtype.itemsize)


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros of ``shape`` whose rows start every 16 bytes: a (.., n) view of a (.., n padded) buffer.
    Build masks in it and :func:`pack_bias` hands them to the kernel without another copy."""
    *lead, n = shape
    return torch.zeros(*lead, padded(n, bias_alignment(dtype)), dtype=dtype, device=device)[..., :n]


def is_aligned_bias(bias: torch.Tensor) -> bool:
    """The contract above: stride(-1) == 1 and every other stride of a dimension longer than 1, and the
    storage offset, a multiple of :func:`bias_alignment` elements."""
    a = bias_alignment(bias.dtype)
    if bias.shape[-1] > 1 and bias.stride(-1) != 1:
        return False
    lead = [st for sz, st in zip(bias.shape[:-1], bias.stride()[:-1], strict=True) if sz > 1]
    return bias.storage_offset() % a == 0 and all(st % a == 0 for st in lead)


def _try_view(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    try:
        return x.view(shape)
    except RuntimeError:  # strides do not allow it
        return None


def pack_bias(mask: torch.Tensor, *, batch: int, heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask as the kernel's bias: (batch, heads, group*Sq, Sk) in ``dtype``, aligned.

    mask: (Sq, Sk) or (B|1, H|1, Sq, Sk) with H = heads*group. Head ``h*group + j`` of the mask goes to rows
    ``j*Sq .. j*Sq+Sq-1`` of bias head ``h`` (``group`` = 1 when no heads are folded). The mask is used in
    place when it already satisfies :func:`is_aligned_bias` (e.g. built with :func:`aligned_zeros`);
    otherwise it is copied once into a padded buffer that keeps broadcast dimensions broadcast.
    """
    m4 = mask if mask.dim() == 4 else mask[None, None]  # (Bm, Hm, Sq, Sk)
    bm, hm, sq, sk = m4.shape
    if hm not in (1, heads * group):
        raise ValueError(f"mask has {hm} heads; valid: 1 or {heads * group} (shape {tuple(mask.shape)})")
    rows = group * sq
    target = (batch, heads, rows, sk)
    if m4.dtype == dtype:
        if hm == 1 and (group == 1 or sq == 1):
            direct = m4.expand(bm, 1, group, sk) if sq == 1 else m4  # one row per folded head: broadcast
        else:
            direct = _try_view(m4, (bm, heads, rows, sk)) if hm > 1 else None
        if direct is not None and is_aligned_bias(direct):
            return direct.expand(target)
    # Copy once: (Bm, Hb, gb*Sq, Sk) with gb = 1 when every folded head reads the same single row.
    hb, gb = (1, 1 if sq == 1 else group) if hm == 1 else (heads, group)
    src = m4.reshape(bm, hb, 1 if hm == 1 else group, sq, sk).expand(bm, hb, gb, sq, sk)
    buf = aligned_zeros((bm, hb, gb * sq, sk), dtype, mask.device)
    buf.view(bm, hb, gb, sq, sk).copy_(src)
    return buf.expand(target)


def pad_lse(lse: torch.Tensor, *, heads: int, group: int) -> torch.Tensor:
    """FINAL lse (B, heads*group, Sq) -> (B, heads, ceil(group*Sq/32)*32) fp32, as the forward made it.

    Rows are folded like :func:`fold_rows`; the padding and every -inf (a row that saw no key) become
    +inf, so those rows contribute exactly nothing to dK/dV."""
    b, _, sq = lse.shape
    rows = group * sq
    buf = torch.empty(b, heads, padded(rows, LSE_ROWS), dtype=torch.float32, device=lse.device)
    buf[..., rows:].fill_(float("inf"))
    src = lse.reshape(b, heads, group, sq)
    buf[..., :rows].view(b, heads, group, sq).copy_(src.masked_fill(torch.isneginf(src), float("inf")))
    return buf


def fold_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, heads*g, S, D) -> (B, g*S, heads, D), a view where the strides allow it (always for g = 1:
    then it is ``x.transpose(1, 2)``)."""
    b, h, s, d = x.shape
    g = h // heads
    return x.view(b, heads, g, s, d).permute(0, 2, 3, 1, 4).reshape(b, g * s, heads, d)


def unfold_rows(y: torch.Tensor, heads_total: int) -> torch.Tensor:
    """Inverse of :func:`fold_rows`: (B, g*S, heads, D) -> (B, heads*g, S, D) (a copy when g > 1)."""
    b, rows, heads, d = y.shape
    g = heads_total // heads
    return y.view(b, g, rows // g, heads, d).permute(0, 3, 1, 2, 4).reshape(b, heads_total, rows // g, d)


def unfold_lse(lse: torch.Tensor, heads_total: int) -> torch.Tensor:
    """(B, heads, g*S) -> (B, heads*g, S), the lse rows of :func:`fold_rows`."""
    b, heads, rows = lse.shape
    g = heads_total // heads
    return lse.reshape(b, heads, g, rows // g).reshape(b, heads_total, rows // g)
