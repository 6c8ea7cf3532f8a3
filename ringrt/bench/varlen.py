"""``ringrt bench varlen``: packed documents (``cu_seqlens``) against the two ways around them.

For each algorithm and each list of document lengths L_0, L_1, ..., in one job of W ranks, three
variants of the same causal attention, forward + backward:

* ``packed``: one ``ringrt.attention(..., cu_seqlens=cu)`` over the packed sequence (B = 1), shards
  from ``ringrt.shard(x, layout="zigzag", cu_seqlens=cu)`` (each document padded to P_i, the next
  multiple of 2W);
* ``padded``: the workaround of one row per document: B = n_docs, every document right-padded to
  the longest and then to a multiple of 2W (``ringrt.pad_to_multiple``, P_max rows), sharded with
  ``layout="zigzag"``, one plain call (causal, so the padding changes no real token);
* ``per_doc``: one plain call per document, each padded to P_i and sharded on its own.

Reported per variant, each as a ratio against ``packed`` of the same run (the machine is shared and
noisy: the ratios are what to read, never the absolute seconds):

* time: fwd+bwd wall clock, the slowest rank (each rank's time to finish, max over ranks), median
  over ``--reps``; the variants are interleaved within each rep and the ratio is the median of the
  per-rep ratios, so a slow drift of the machine hits all alike;
* bytes sent per rank in one fwd+bwd (the channel counters, ``ringrt.distributed.comm``; the
  largest over ranks) and messages sent;
* score entries the causal masks keep in the forward, counted by the document kernel
  (``ringrt.ops.document_kernel.scores_counted``) and summed over ranks. The plain calls of the two
  workarounds run no document kernel, so their count comes from one extra forward of the same
  shards as a single document (``cu_seqlens=[0, P]``: the same layout, blocks and masks as the
  plain call), outside the timing. Causal: packed = B H sum_i P_i (P_i + 1) / 2, padded =
  n_docs H P_max (P_max + 1) / 2, per_doc = packed;
* rows processed, padding included, over all ranks: packed and per_doc sum_i P_i, padded
  n_docs P_max. For a fixed algorithm the bytes scale with these rows (every schedule moves whole
  rows of its shards); ``auto`` may pick a different algorithm for each variant.

The three must agree: the first (warm-up) rep gathers each variant's output and q/k/v gradients of
the real tokens (``ringrt.unshard``) and prints the largest difference from ``packed``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..api import attention, shard, unshard
from ..distributed import comm
from ..distributed.spawn import run_local
from ..ops.document_kernel import reset_scores, scores_counted
from ..ops.layout import pad_to_multiple
from .report import maybe_plot, write_json

VARIANTS = ("packed", "padded", "per_doc")

# ring-flash-attention's varlen test lengths, and 16 documents with a heavy (Zipf-like) tail: one long, many short
DEFAULT_DOCS = ["120,1128,2984", "1500,530,289,188,134,102,81,66,56,47,41,36,32,29,26,23"]


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a document list is comma-separated lengths, e.g. 120,1128,2984") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every document needs at least 1 token")
    return lengths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, default=2, help="ranks (one thread each)")
    p.add_argument("--docs", type=_lengths, nargs="+", default=[_lengths(d) for d in DEFAULT_DOCS], metavar="L0,L1,...",
                   help="one case per argument: comma-separated document lengths (default: ring-flash-attention's "
                        "test lengths 120,1128,2984 and 16 heavy-tailed documents)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--algorithms", nargs="+", default=["tokenring", "ring"],
                   choices=["tokenring", "ring", "allgather", "ulysses", "hybrid", "auto"])
    p.add_argument("--reps", type=int, default=3, help="measured reps (each times every variant once), after one warm-up")
    p.add_argument("--out", default="bench_results/varlen.json")


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def padded_len(n: int, world: int) -> int:
    """A document of n tokens cut for zigzag: padded to the next multiple of 2W."""
    return -(-n // (2 * world)) * 2 * world


def expected(lengths, world: int, heads: int) -> dict[str, dict[str, int]]:
    """Per variant: score entries kept by the causal masks (forward, summed over ranks) and rows
    processed over all ranks, padding included (the formulas of the module docstring)."""
    p = [padded_len(x, world) for x in lengths]
    pmax = max(p)
    packed = {"scores": heads * sum(x * (x + 1) // 2 for x in p), "rows": sum(p)}
    return {"packed": packed, "padded": {"scores": len(p) * heads * pmax * (pmax + 1) // 2, "rows": len(p) * pmax},
            "per_doc": dict(packed)}


class _Variant:
    """One way to run the case: its calls (local q, k, v, dout and keyword arguments), how to count
    its work, and how to put its results back into the packed sequence's order."""

    def __init__(self, name: str, calls: list[tuple], count_kw: list[dict], assemble):
        self.name, self.calls, self.count_kw, self.assemble = name, calls, count_kw, assemble

    def run(self, algorithm: str) -> list[tuple]:
        """fwd+bwd of every call: [(out, q, k, v) leaves with their .grad], in call order."""
        res = []
        for (q, k, v, do), kw in self.calls:
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            o = attention(*leaves, causal=True, layout="zigzag", algorithm=algorithm, **kw)
            o.backward(do)
            res.append((o.detach(), *leaves))
        return res

    @torch.no_grad()
    def count(self, algorithm: str) -> int:
        """Score entries of one forward, summed over ranks. ``auto`` first tunes each new signature
        by running its candidates: one uncounted forward before, so that only the chosen one counts."""
        for _ in range(2 if algorithm == "auto" else 1):
            reset_scores()
            for ((q, k, v, _do), _kw), ckw in zip(self.calls, self.count_kw, strict=True):
                attention(q, k, v, causal=True, layout="zigzag", algorithm=algorithm, **ckw)
        t = torch.tensor([scores_counted()], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def full(self, res: list[tuple]) -> list[torch.Tensor]:
        """[out, dq, dk, dv] of the real tokens, (1, S, heads, D), from every rank's results (collective)."""
        return [self.assemble([r[0] if i == 0 else r[i].grad for r in res]) for i in range(4)]


def _right_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (1, L, ...) padded with zeros to n >= L rows."""
    return torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], dim=1)


def _variants(full: tuple, lengths: list[int], world: int) -> list[_Variant]:
    cu = _cu(lengths)
    starts = cu.tolist()
    docs = [tuple(x[:, a:b] for x in full) for a, b in zip(starts, starts[1:], strict=False)]
    n = 2 * world

    packed_calls = [(tuple(shard(x, layout="zigzag", cu_seqlens=cu) for x in full), {"cu_seqlens": cu})]
    packed = _Variant("packed", packed_calls, [{"cu_seqlens": cu}],
                      lambda xs: unshard(xs[0], layout="zigzag", cu_seqlens=cu))

    lmax = max(lengths)
    rows = tuple(pad_to_multiple(torch.cat([_right_pad(d[j], lmax) for d in docs]), n)
                 for j in range(4))  # (n_docs, P_max, ...): padding at every row's end, dout 0 there
    pmax = rows[0].shape[1]

    def padded_assemble(xs):
        f = unshard(xs[0], layout="zigzag")
        return torch.cat([f[i : i + 1, :x] for i, x in enumerate(lengths)], dim=1)

    padded = _Variant("padded", [(tuple(shard(x, layout="zigzag") for x in rows), {})],
                      [{"cu_seqlens": _cu([pmax])}], padded_assemble)

    one = [tuple(shard(pad_to_multiple(x, n), layout="zigzag") for x in d) for d in docs]

    def per_doc_assemble(xs):
        return torch.cat([unshard(x, layout="zigzag")[:, :ln] for x, ln in zip(xs, lengths, strict=True)], dim=1)

    per_doc = _Variant("per_doc", [(c, {}) for c in one], [{"cu_seqlens": _cu([padded_len(x, world)])} for x in lengths],
                       per_doc_assemble)
    return [packed, padded, per_doc]


def _time(fn) -> tuple[float, object]:
    """(wall seconds, result) of one call: every rank's time from a common start to its end, the largest."""
    dist.barrier()
    t0 = time.perf_counter()
    res = fn()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item()), res


def _max_over_ranks(x: int) -> int:
    t = torch.tensor([x], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _bytes(variant: _Variant, algorithm: str) -> dict:
    comm.reset_stats()
    variant.run(algorithm)
    st = comm.stats()
    return {"bytes_sent_per_rank": _max_over_ranks(sum(c.bytes_sent for c in st.values())),
            "sends_per_rank": _max_over_ranks(sum(c.sends for c in st.values())),
            "bytes_by_channel": {k: v.bytes_sent for k, v in st.items()}}  # this rank's (the JSON has rank 0's)


def _job(rank: int, world: int, cfg: dict) -> list[dict]:
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    h, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    rows = []
    for algorithm in cfg["algorithms"]:
        for case, lengths in enumerate(cfg["docs"]):
            s = sum(lengths)
            g = torch.Generator().manual_seed(case)  # the same full tensors on every rank
            full = (torch.randn(1, s, h, d, generator=g).to(dtype), torch.randn(1, s, kvh, d, generator=g).to(dtype),
                    torch.randn(1, s, kvh, d, generator=g).to(dtype), torch.randn(1, s, h, d, generator=g).to(dtype))
            variants = _variants(full, lengths, world)
            times: dict[str, list[float]] = {v.name: [] for v in variants}
            diffs: dict[str, dict[str, float]] = {}
            for rep in range(cfg["reps"] + 1):  # rep 0: warm-up, and the numerical agreement
                results: dict[str, list[tuple]] = {}
                for v in variants:
                    t, results[v.name] = _time(functools.partial(v.run, algorithm))
                    if rep:
                        times[v.name].append(t)
                if rep == 0:
                    ref = variants[0].full(results["packed"])
                    for v in variants:
                        got = v.full(results[v.name])
                        diffs[v.name] = {k: float((a.double() - b.double()).abs().max())
                                         for k, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)}
            exp = expected(lengths, world, h)
            measured = {v.name: {**_bytes(v, algorithm), "scores": v.count(algorithm)} for v in variants}
            base_t, base = times["packed"], measured["packed"]
            for v in variants:
                m = measured[v.name]
                rows.append({
                    "algorithm": algorithm, "case": case, "lengths": list(lengths), "n_docs": len(lengths), "tokens": s,
                    "variant": v.name, "calls": len(v.calls),
                    "t_s": statistics.median(times[v.name]), "t_all_s": times[v.name],
                    "t_ratio": statistics.median(a / b for a, b in zip(times[v.name], base_t, strict=True)),
                    **m,
                    "bytes_ratio": m["bytes_sent_per_rank"] / base["bytes_sent_per_rank"] if base["bytes_sent_per_rank"] else None,
                    "scores_ratio": m["scores"] / base["scores"],
                    "scores_formula": exp[v.name]["scores"],
                    "rows": exp[v.name]["rows"], "rows_ratio": exp[v.name]["rows"] / exp["packed"]["rows"],
                    "max_abs_diff_vs_packed": diffs[v.name],
                })
    return rows


def main(args: argparse.Namespace) -> int:
    if args.world < 2:
        raise SystemExit(f"--world={args.world}: the comparison needs at least 2 ranks")
    if args.reps < 1:
        raise SystemExit(f"--reps={args.reps}: at least 1")
    cfg = dict(vars(args))
    t0 = time.time()
    rows = run_local(_job, args.world, cfg, timeout=3600, threads=1)[0]
    print(f"Packed documents vs the workarounds, causal fwd+bwd, W={args.world} ranks x 1 thread, "
          f"H={args.heads}/{args.kv_heads} D={args.head_dim} {args.dtype}, {os.cpu_count()} cores, median of {args.reps} reps")
    print("ratios against packed in the same run; time: slowest rank; MB: sent per rank (largest rank); "
          "scores: score entries kept (all ranks); rows: processed incl. padding (all ranks); diff: max |x - packed| over out, dq, dk, dv")
    print(f"{'algorithm':>9} {'case':>4} {'docs':>4} {'tokens':>6} {'variant':>7} {'calls':>5} {'time s':>7} {'t ratio':>7} "
          f"{'MB/rank':>7} {'B ratio':>7} {'sends':>5} {'scores':>11} {'s ratio':>7} {'rows':>6} {'r ratio':>7} {'diff':>8}")
    for r in rows:
        diff = max(r["max_abs_diff_vs_packed"].values())
        br = f"{r['bytes_ratio']:>7.3f}" if r["bytes_ratio"] is not None else f"{'-':>7}"
        print(f"{r['algorithm']:>9} {r['case']:>4} {r['n_docs']:>4} {r['tokens']:>6} {r['variant']:>7} {r['calls']:>5} {r['t_s']:>7.3f} "
              f"{r['t_ratio']:>7.2f} {r['bytes_sent_per_rank'] / 1e6:>7.2f} {br} {r['sends_per_rank']:>5} {r['scores']:>11} "
              f"{r['scores_ratio']:>7.3f} {r['rows']:>6} {r['rows_ratio']:>7.3f} {diff:>8.1e}")
    meta = {k: v for k, v in cfg.items() if k != "out"}
    meta.update(torch=torch.__version__, cpus=os.cpu_count(), wall_s=round(time.time() - t0, 1))
    write_json(args.out, {"benchmark": "varlen", "config": meta, "rows": rows})
    png = maybe_plot(args.out, [dict(r, label=f"{r['algorithm']} case {r['case']}") for r in rows], x="variant",
                     ys=["t_ratio", "scores_ratio"], group="label",
                     title=f"Packed documents vs workarounds, W={args.world}", ylabel="ratio to packed")
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
