"""``ringrt bench attention``: TokenRing fwd+bwd on W ranks vs one process with W threads.

Both sides get the same cores: W ranks of one intra-op thread each, against one process running
PyTorch's own attention with W threads over the same total sequence. The two are measured
alternately inside one job (single, ring, single, ring, ...) and the efficiency is the median of
the per-pair ratios ``t_single / t_ring``, so slow drifts of a noisy machine cancel out.
Also reported: bytes moved per rank per call (forward and backward) from the channel counters.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import comm
from ..api import attention, shard
from ..distributed.spawn import run_local
from .report import write_json, maybe_plot


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, default=2, help="ranks (each with one thread); the baseline gets this many threads")
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192], help="total sequence lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads (MHA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--topology", choices=["full", "ring"], default="full")
    p.add_argument("--reps", type=int, default=3, help="measured (single, ring) pairs per length, after one warm-up")
    p.add_argument("--out", default="bench_results/attention.json")


def _sync():
    dist.barrier()


def _time(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _sides(rank: int, world: int, cfg: dict, layout: str, full, local):
    """(single, ring): one call, ``fwd_only`` or fwd+bwd, of each side on one length's tensors
    (``full``: q, k, v, do of the whole sequence; ``local``: this rank's shards of them)."""
    q, k, v, do = full
    ql, kl, vl, dol = local
    kvh, h = cfg["kv_heads"], cfg["heads"]

    def single(fwd_only: bool):
        if rank != 0:
            return
        torch.set_num_threads(world)
        qs, ks, vs = (x.transpose(1, 2).requires_grad_(not fwd_only) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=cfg["causal"], enable_gqa=kvh != h)
        if not fwd_only:
            o.backward(do.transpose(1, 2))
        torch.set_num_threads(1)

    def ring(fwd_only: bool):
        qr, kr, vr = (x.detach().requires_grad_(not fwd_only) for x in (ql, kl, vl))
        o = attention(qr, kr, vr, causal=cfg["causal"], layout=layout, topology=cfg["topology"])
        if not fwd_only:
            o.backward(dol)

    return single, ring


def _job(rank: int, world: int, cfg: dict) -> list[dict]:
    dtype = getattr(torch, cfg["dtype"])
    h, kvh, d, b = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["batch"]
    layout = "zigzag" if cfg["causal"] else "contiguous"
    rows = []
    for s in cfg["seqs"]:
        g = torch.Generator().manual_seed(s)
        q = torch.randn(b, s, h, d, generator=g).to(dtype)
        k = torch.randn(b, s, kvh, d, generator=g).to(dtype)
        v = torch.randn(b, s, kvh, d, generator=g).to(dtype)
        do = torch.randn(b, s, h, d, generator=g).to(dtype)
        local = tuple(shard(x, layout=layout) for x in (q, k, v, do))
        single, ring = _sides(rank, world, cfg, layout, (q, k, v, do), local)

        torch.set_num_threads(1)
        for fwd_only in (True, False):
            single(fwd_only), ring(fwd_only)  # warm-up
            ts, tr = [], []
            for _ in range(cfg["reps"]):
                ts.append(_time(functools.partial(single, fwd_only)))
                tr.append(_time(functools.partial(ring, fwd_only)))
            comm.reset_stats()
            ring(fwd_only)
            st = comm.stats()
            rows.append({
                "seq": s, "pass": "fwd" if fwd_only else "fwd+bwd",
                "t_single_s": statistics.median(ts), "t_ring_s": statistics.median(tr),
                "efficiency": statistics.median(a / b_ for a, b_ in zip(ts, tr, strict=True)),
                "bytes_sent_per_rank": sum(c.bytes_sent for c in st.values()),
                "bytes_recv_per_rank": sum(c.bytes_recv for c in st.values()),
                "bytes_by_channel": {k_: v_.bytes_sent for k_, v_ in st.items()},
            })
    return rows


def main(args: argparse.Namespace) -> int:
    if args.world < 2:
        raise SystemExit(f"--world={args.world}: the comparison needs at least 2 ranks")
    cfg = dict(vars(args))
    cfg["kv_heads"] = args.kv_heads or args.heads
    bad = [s for s in args.seqs if s % (2 * args.world)]
    if bad:
        raise SystemExit(f"--seqs {bad}: each length must be a multiple of 2 x world = {2 * args.world}")
    t0 = time.time()
    rows = run_local(_job, args.world, cfg, timeout=3600, threads=1)[0]
    print(f"TokenRing vs one process, W={args.world} ranks x 1 thread vs 1 process x {args.world} threads; "
          f"B={args.batch} H={args.heads}/{cfg['kv_heads']} D={args.head_dim} {args.dtype} causal={args.causal} "
          f"topology={args.topology}")
    print(f"{'seq':>7} {'pass':>8} {'single s':>9} {'ring s':>8} {'efficiency':>10} {'MB sent/rank':>12}")
    for r in rows:
        print(f"{r['seq']:>7} {r['pass']:>8} {r['t_single_s']:>9.3f} {r['t_ring_s']:>8.3f} {r['efficiency']:>10.3f} "
              f"{r['bytes_sent_per_rank'] / 1e6:>12.2f}")
    meta = {k: v for k, v in cfg.items() if k != "out"}
    meta.update(torch=torch.__version__, cpus=os.cpu_count(), wall_s=round(time.time() - t0, 1))
    write_json(args.out, {"benchmark": "attention", "config": meta, "rows": rows})
    png = maybe_plot(args.out, rows, x="seq", ys=["efficiency"], group="pass",
                     title=f"TokenRing parallel efficiency, W={args.world}", ylabel="t_single / t_ring")
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
