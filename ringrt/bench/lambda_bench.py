"""``ringrt bench lambda``: how Λ-mask attention scales with the sequence and with the ranks.

For each world size W and total length N: fwd+bwd time of ``lambda_attention`` (median over reps,
slowest rank, barriers around each call) and bytes sent + received per rank (channel counters; the
largest over ranks), plus, with ``--dense``, exact causal TokenRing attention at the first W for
contrast. Printed checks (the targets):

* fixed W, N -> 4N: Λ time ratio <= 4.4 (dense ~16), Λ bytes per rank ratio <= 1.1;
* fixed N, W -> larger W: Λ bytes per rank do not grow. Per pass (the forward's halo + global K/V
  received, the backward's gradients received) the largest rank's bytes are the same at every W.
  The total per rank (sent + received, both passes) doubles from W = 2 to W = 3 and is flat after:
  at W = 2 each rank has one neighbour, so it only sends or only receives in each pass.

The machine is shared and has few cores: runs with more ranks than cores time-share them, so their
wall times mean little. Besides wall time each point also records the CPU time of the busiest rank
(``time.process_time`` around the call), which other jobs on the machine do not inflate.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..distributed import comm
from ..api import attention
from ..lm_infinite import LambdaMask, lambda_attention
from ..distributed.spawn import run_local
from .report import maybe_plot, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4], help="world sizes (first one is also timed dense)")
    p.add_argument("--seqs", type=int, nargs="+", default=[3072, 12288], help="total sequence lengths N")
    p.add_argument("--global_branch", "--n-global", dest="n_global", type=int, default=16, help="LambdaMask.n_global")
    p.add_argument("--local_branch", "--n-local", dest="n_local", type=int, default=512, help="LambdaMask.n_local")
    p.add_argument("--limit_distance", "--limit-distance", dest="limit_distance", type=int, default=None)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block-size", type=int, default=None, help="query rows per kernel call (default 512)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--algorithm", choices=["ring", "tokenring"], default="ring", help="how the halo moves")
    p.add_argument("--reps", type=int, default=5, help="measured calls per point, after one warm-up")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="also time dense causal TokenRing")
    p.add_argument("--out", default="bench_results/lambda.json")


def _time_once(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the busiest rank) of one call."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    cpu = time.process_time() - c0
    dist.barrier()
    wall = time.perf_counter() - t0
    c = torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(c, op=dist.ReduceOp.MAX)
    return wall, float(c.item())


def _max_over_ranks(x: int) -> int:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _bytes(fwd, do) -> dict:
    """Bytes per rank (largest over ranks) of one call: in total, and per pass and direction."""
    comm.reset_stats()
    out = fwd()
    st_f = comm.stats()
    comm.reset_stats()
    out.backward(do)
    st_b = comm.stats()
    tot = lambda st, f: sum(getattr(c, f) for c in st.values())  # noqa: E731
    return {
        "bytes_per_rank": _max_over_ranks(tot(st_f, "bytes_sent") + tot(st_f, "bytes_recv") + tot(st_b, "bytes_sent") + tot(st_b, "bytes_recv")),
        "fwd_recv_per_rank": _max_over_ranks(tot(st_f, "bytes_recv")),
        "fwd_sent_per_rank": _max_over_ranks(tot(st_f, "bytes_sent")),
        "bwd_recv_per_rank": _max_over_ranks(tot(st_b, "bytes_recv")),
        "bwd_sent_per_rank": _max_over_ranks(tot(st_b, "bytes_sent")),
        "bytes_by_channel": {k: v.bytes_sent + v.bytes_recv for k, v in {**st_f, **st_b}.items()},
    }


def _forward_backward(fwd, do) -> None:
    fwd().backward(do)


def _median_ratio(ts, first, i: int) -> float:
    """Median over reps of ``ts[rep][i] / first[rep][i]`` (i = 0: wall time, 1: CPU time)."""
    return statistics.median(a[i] / b[i] for a, b in zip(ts, first, strict=True))


def _job(rank: int, world: int, cfg: dict) -> list[dict]:
    """Every (kind, N) point is timed once per rep, the points interleaved within each rep, so that a
    slow drift of the shared machine hits all points alike; ratios are then taken per rep."""
    dtype = getattr(torch, cfg["dtype"])
    b, h, kvh, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    mask = LambdaMask(n_global=cfg["n_global"], n_local=cfg["n_local"], limit_distance=cfg["limit_distance"])
    points = []
    for n in cfg["seqs"]:
        s = n // world
        g = torch.Generator().manual_seed(1000 * rank + n)  # each rank makes only its own shard
        q, do = (torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(2))
        k, v = (torch.randn(b, s, kvh, d, generator=g).to(dtype) for _ in range(2))

        def lam_fwd(q=q, k=k, v=v):
            ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))
            return lambda_attention(ql, kl, vl, mask=mask, block_size=cfg["block_size"], algorithm=cfg["algorithm"])

        def dense_fwd(q=q, k=k, v=v):
            ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))
            return attention(ql, kl, vl, causal=True, layout="zigzag")

        points.append(("lambda", n, lam_fwd, do))
        if cfg["with_dense"]:
            points.append(("dense", n, dense_fwd, do))
    times: dict[tuple[str, int], list[tuple[float, float]]] = {(kind, n): [] for kind, n, _, _ in points}
    for rep in range(cfg["reps"] + 1):  # rep 0 is the warm-up
        for kind, n, fwd, do in points:
            t = _time_once(functools.partial(_forward_backward, fwd, do))
            if rep:
                times[kind, n].append(t)
    rows = []
    for kind, n, fwd, do in points:
        ts, first = times[kind, n], times[kind, cfg["seqs"][0]]
        rows.append({"kind": kind, "world": world, "seq": n,
                     "t_s": statistics.median(t[0] for t in ts), "cpu_s": statistics.median(t[1] for t in ts),
                     "t_all_s": [t[0] for t in ts], "cpu_all_s": [t[1] for t in ts],
                     "t_ratio_vs_first_seq": _median_ratio(ts, first, 0), "cpu_ratio_vs_first_seq": _median_ratio(ts, first, 1),
                     **_bytes(fwd, do)})
    return rows


def _ratio(rows, kind, world, key):
    sel = sorted((r for r in rows if r["kind"] == kind and r["world"] == world), key=lambda r: r["seq"])
    if len(sel) < 2 or sel[0][key] == 0:
        return None
    return sel[-1][key] / sel[0][key], sel[-1]["seq"] / sel[0]["seq"]


def _checks(rows: list[dict], args: argparse.Namespace) -> dict:
    """The targets of the module docstring, from the rows: per kind and W, the last length's time,
    CPU time and bytes over the first's; per N, Λ's bytes at the last W over the first W."""
    checks = {}
    for kind in ("lambda", "dense"):
        for w in args.worlds:
            t, b = _ratio(rows, kind, w, "t_ratio_vs_first_seq"), _ratio(rows, kind, w, "bytes_per_rank")
            c = _ratio(rows, kind, w, "cpu_ratio_vs_first_seq")
            if t:  # the last row's median per-rep ratio to the first length (the first row's is 1)
                checks[f"{kind}_W{w}_seq_ratio"] = t[1]
                checks[f"{kind}_W{w}_time_ratio"] = round(t[0], 3)
                checks[f"{kind}_W{w}_cpu_time_ratio"] = round(c[0], 3)
            if b:
                checks[f"{kind}_W{w}_bytes_ratio"] = round(b[0], 4)
    for n in args.seqs:
        for key in ("bytes_per_rank", "fwd_recv_per_rank", "bwd_recv_per_rank"):
            per_w = [r[key] for w in args.worlds for r in rows if r["kind"] == "lambda" and r["world"] == w and r["seq"] == n]
            if len(per_w) == len(args.worlds) and per_w[0]:
                checks[f"lambda_N{n}_{key}_W{args.worlds[-1]}_over_W{args.worlds[0]}"] = round(per_w[-1] / per_w[0], 4)
    return checks


def main(args: argparse.Namespace) -> int:
    cfg = dict(vars(args))
    bad = [(n, w) for n in args.seqs for w in args.worlds if n % w]
    if bad:
        raise SystemExit(f"--seqs/--worlds {bad}: every N must be a multiple of every world size (contiguous shards)")
    p = LambdaMask(n_global=args.n_global, n_local=args.n_local, limit_distance=args.limit_distance).problem()
    if p:
        raise SystemExit(p)
    t0 = time.time()
    rows: list[dict] = []
    for i, w in enumerate(args.worlds):
        rows += run_local(_job, w, {**cfg, "with_dense": args.dense and i == 0}, timeout=7200, threads=1)[0]

    print(f"Λ-mask attention ({args.algorithm}) fwd+bwd: n_global={args.n_global} n_local={args.n_local} limit={args.limit_distance or args.n_local} "
          f"B={args.batch} H={args.heads}/{args.kv_heads} D={args.head_dim} {args.dtype}, 1 thread per rank, {os.cpu_count()} cores")
    print("MB/rank: sent + received in fwd + bwd; fwd recv / bwd recv: per pass (all largest over ranks)")
    print("time s: wall clock of one fwd+bwd call; cpu s: CPU time of the busiest rank (robust to a busy machine)")
    print(f"{'kind':>6} {'W':>3} {'N':>7} {'time s':>8} {'cpu s':>7} {'MB/rank':>8} {'fwd recv':>9} {'bwd recv':>9}")
    for r in rows:
        print(f"{r['kind']:>6} {r['world']:>3} {r['seq']:>7} {r['t_s']:>8.3f} {r['cpu_s']:>7.3f} {r['bytes_per_rank'] / 1e6:>8.3f} "
              f"{r['fwd_recv_per_rank'] / 1e6:>9.3f} {r['bwd_recv_per_rank'] / 1e6:>9.3f}")
    checks = _checks(rows, args)
    print("checks:")
    for k, val in checks.items():
        print(f"  {k} = {val}")
    meta = {k: v for k, v in cfg.items() if k != "out"}
    meta.update(torch=torch.__version__, cpus=os.cpu_count(), wall_s=round(time.time() - t0, 1))
    write_json(args.out, {"benchmark": "lambda", "config": meta, "rows": rows, "checks": checks})
    w0 = args.worlds[0]
    png = maybe_plot(args.out, [r for r in rows if r["world"] == w0], x="seq", ys=["t_s", "cpu_s"], group="kind",
                     title=f"Λ-mask vs dense causal attention, W={w0}, fwd+bwd", ylabel="seconds")
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
