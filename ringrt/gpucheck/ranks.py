"""Every schedule, and the Λ-mask ring, over several ranks against a single-process fp64 reference.

Run by :func:`ringrt.distributed.spawn.run_local` on one process per GPU (``cpu:gloo,cuda:nccl``) or per CPU
rank (gloo). Every rank builds the same full problem from a seed, runs its shard forward and
backward, and compares its shard of the output and of dq/dk/dv with the fp64 reference; the
tolerance is twice the error of the same computation done plainly, in one process, in the
schedule's precision, plus two units of roundoff times the reference's magnitude.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .kernels import roundoff_floor
from .reference import attend


def _row(name: str, dtype, got, ref, base) -> dict:
    errs = {n: (g.double() - r).abs().max().item() for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)}
    tols = {n: 2 * (b.double() - r).abs().max().item() + roundoff_floor(dtype, r)
            for n, b, r in zip(("out", "dq", "dk", "dv"), base, ref, strict=True)}
    ok = all(math.isfinite(errs[n]) and errs[n] <= tols[n] for n in errs)
    return {"check": name, "dtype": str(dtype).replace("torch.", ""), "ok": ok, "max_abs_err": errs, "tolerance": tols}


def _plain(q, k, v, do, causal: bool, upcast: bool):
    """Single-process attention on full (B, S, H, D) tensors: (out, dq, dk, dv) in (B, S, H, D)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, _ = attend(*(x.transpose(1, 2) for x in leaves), causal=causal, mask=None,
                    scale=1.0 / math.sqrt(q.shape[-1]), upcast=upcast)
    out = out.transpose(1, 2)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def schedules_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    """Every algorithm of ``ringrt.ALGORITHMS`` x dtype x causal, then Λ (both ring algorithms), then
    packed documents (every algorithm)."""
    import ringrt
    from ..distributed.device import job_device

    device = job_device()
    per_rank, heads, kv_heads, d = cfg["per_rank"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    s = per_rank * world
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, s, h, d, generator=gen, dtype=torch.float64).to(device) for h in (heads, kv_heads, kv_heads, heads)]
    rows = []
    for dtype in (getattr(torch, n) for n in cfg["dtypes"]):
        q, k, v, do = (x.to(dtype) for x in full)
        for causal in (True, False):
            layout = "zigzag" if causal else "contiguous"
            ref = _plain(*full, causal, upcast=True)
            base = _plain(q, k, v, do, causal, upcast=False)
            ref_l = [ringrt.shard(x, layout=layout) for x in ref]
            base_l = [ringrt.shard(x, layout=layout) for x in base]
            for algo in ringrt.ALGORITHMS:
                ql, kl, vl = (ringrt.shard(x, layout=layout).detach().clone().requires_grad_() for x in (q, k, v))
                out = ringrt.attention(ql, kl, vl, causal=causal, algorithm=algo)
                out.backward(ringrt.shard(do, layout=layout))
                got = [out.detach(), ql.grad, kl.grad, vl.grad]
                rows.append(_row(f"{algo} {'causal' if causal else 'full'} {heads}/{kv_heads} heads", dtype, got, ref_l, base_l))
        rows += _lambda_rows(rank, world, q, k, v, do, full, dtype)
        rows += _document_rows(q, k, v, do, full, dtype, heads, kv_heads)
    return rows


def _document_rows(q, k, v, do, full, dtype, heads, kv_heads) -> list[dict]:
    """Packed documents (``cu_seqlens``: odd lengths, a single-token one) with every algorithm, causal,
    against each document attended alone (fp64 reference, same-precision baseline)."""
    import ringrt

    s = q.shape[1]
    lengths = [s // 4 + 1, 1, s // 2 - 3]
    lengths.append(s - sum(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])

    def per_document(x, upcast):
        parts = [_plain(*(t[:, a:b] for t in x), True, upcast=upcast) for a, b in zip(cu.tolist(), cu.tolist()[1:], strict=False)]
        return [torch.cat(ts, dim=1) for ts in zip(*parts, strict=True)]

    ref, base = per_document(full, True), per_document((q, k, v, do), False)
    rows = []
    for algo in ringrt.ALGORITHMS:
        ql, kl, vl = (ringrt.shard(x, layout="zigzag", cu_seqlens=cu).detach().clone().requires_grad_() for x in (q, k, v))
        out = ringrt.attention(ql, kl, vl, cu_seqlens=cu, algorithm=algo)
        out.backward(ringrt.shard(do, layout="zigzag", cu_seqlens=cu))
        got = [ringrt.unshard(t, layout="zigzag", cu_seqlens=cu) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
        rows.append(_row(f"{algo} packed documents {lengths} {heads}/{kv_heads} heads", dtype, got, ref, base))
    return rows


def _lambda_rows(rank, world, q, k, v, do, full, dtype) -> list[dict]:
    """Λ-mask over the ranks vs the same call on one rank: fp64 math kernel (reference) and the
    device kernel in ``dtype`` (same-precision baseline)."""
    import ringrt

    singles = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates all
    mask = ringrt.LambdaMask(n_global=4, n_local=max(2, q.shape[1] // world // 2 + 3))

    def one_rank(x, kernel):
        leaves = [t.detach().clone().requires_grad_() for t in x[:3]]
        out = ringrt.lambda_attention(*leaves, mask=mask, kernel=kernel, group=singles[rank])
        out.backward(x[3].to(out.dtype))
        return [ringrt.shard(t, layout="contiguous") for t in [out.detach()] + [t.grad for t in leaves]]

    ref = one_rank(full, "math")
    base = one_rank((q, k, v, do), "auto")
    rows = []
    for algorithm in ("ring", "tokenring"):
        leaves = [ringrt.shard(x, layout="contiguous").detach().clone().requires_grad_() for x in (q, k, v)]
        out = ringrt.lambda_attention(*leaves, mask=mask, algorithm=algorithm)
        out.backward(ringrt.shard(do, layout="contiguous"))
        got = [out.detach()] + [t.grad for t in leaves]
        rows.append(_row(f"lambda {algorithm} (n_global={mask.n_global}, n_local={mask.n_local})", dtype, got, ref, base))
    return rows
