"""``ringrt bench compare``: every schedule and the outside peers, side by side, on this machine.

Runs (CPU, gloo, 1 thread per rank) W = 1, 2, 4 x MHA/GQA x sequence lengths x forward / forward +
backward: tokenring, ring, allgather, ulysses, hybrid, auto; DeepSpeed's ``DistributedAttention``
(Ulysses; contiguous shards, if deepspeed is installed); torch's ``context_parallel`` (non-causal
forward only: all it supports on CPU); one process (``single``: the block kernel on the whole
sequence). Reports time (max over ranks, best of ``--reps``), parallel efficiency (single / (W x
time)), bytes sent per rank (ringrt's counters; peers: n/a), peak RSS growth per rank, the cost
model's prediction (calibrated at the start of the run) and its error, and the kernel's FLOP/s as a
fraction of torch.mm's on the same thread (the roofline). Writes JSON + PNG under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OURS = ("tokenring", "ring", "allgather", "ulysses", "hybrid", "auto")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    p.add_argument("--worlds", type=int, nargs="+", default=None)
    p.add_argument("--seqs", type=int, nargs="+", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench_results"))


class _PeakRSS:
    """Sample this process's RSS every millisecond; ``peak - base`` in bytes."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _inputs(world, rank, seq, heads, kv_heads, d, layout, grad):
    import ringrt

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq, h, d, generator=g) for h in (heads, kv_heads, kv_heads)]
    if world == 1:
        return [x.requires_grad_(grad) for x in full]
    return [ringrt.shard(x, layout=layout).requires_grad_(grad) for x in full]


def _call(name, q, k, v, causal, world, ds_attn):
    import ringrt

    if name == "single":
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                              enable_gqa=True).transpose(1, 2)
    if name == "deepspeed":
        return ds_attn(q, k, v, 0)
    if name == "torch_cp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cpu", (world,))
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        with context_parallel(mesh, buffers=[qh, kh, vh], buffer_seq_dims=[2, 2, 2]):
            return F.scaled_dot_product_attention(qh, kh, vh)
    return ringrt.attention(q, k, v, causal=causal, algorithm=name)


def _worker(rank, world, grid, reps):
    import torch.distributed as dist

    from ringrt import comm

    ds_attn = None
    if world > 1:
        try:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed
            from deepspeed.sequence.layer import DistributedAttention

            deepspeed.init_distributed(dist_backend="gloo")

            def local(q_, k_, v_, *a, **kw):
                return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                      is_causal=kw.get("causal", True), enable_gqa=True).transpose(1, 2)

            ds_attn = DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        except Exception as e:  # not installed or not usable here: reported as skipped
            ds_attn = repr(e)[:120]
    rows = []
    for seq, heads, kv_heads, d, causal, mode in grid:
        names = ["single"] if world == 1 else [*OURS, "deepspeed", "torch_cp"]
        for name in names:
            row = dict(world=world, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=d, causal=causal, mode=mode, name=name)
            skip = None
            if name == "torch_cp" and (causal or mode != "fwd"):
                skip = "torch context_parallel on CPU: non-causal forward only"
            if name == "deepspeed" and not callable(ds_attn):
                skip = f"deepspeed unavailable: {ds_attn}"
            if name in ("ulysses",) and (heads % world or (kv_heads % world and world % kv_heads)):
                skip = "heads do not split over W"
            if skip:
                row["skipped"] = skip
                rows.append(row)
                continue
            layout = "contiguous" if (name == "deepspeed" or not causal) else "zigzag"
            if name == "torch_cp":
                layout = "full"
            grad = mode == "fwd+bwd"
            try:
                best, rss, sent = float("inf"), 0, 0
                for i in range(reps + 1):
                    if name == "torch_cp":
                        q, k, v = _inputs(1, rank, seq, heads, kv_heads, d, layout, False)
                    else:
                        q, k, v = _inputs(world, rank, seq, heads, kv_heads, d, layout, grad)
                    if name == "deepspeed":
                        ds_attn.local_attn = _causal_local(causal)
                    if world > 1:
                        dist.barrier()
                    comm.reset_stats()
                    with _PeakRSS() as mem:
                        t0 = time.perf_counter()
                        out = _call(name, q, k, v, causal, world, ds_attn)
                        if grad:
                            out.backward(torch.ones_like(out))
                        dt = time.perf_counter() - t0
                    if i > 0:
                        best = min(best, dt)
                        rss = max(rss, mem.peak - mem.base)
                        sent = sum(c.bytes_sent for n, c in comm.stats().items() if n != "auto")
                row.update(time=best, rss=rss, bytes_sent=sent if name not in ("deepspeed", "torch_cp") else None)
            except Exception as e:
                row["skipped"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
    return rows


def _causal_local(causal):
    def local(q_, k_, v_, *a, **kw):
        return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), is_causal=causal,
                                              enable_gqa=True).transpose(1, 2)
    return local


def _roofline(threads: int = 1) -> dict:
    from ringrt.simulate.calibrate import kernel_rate, mm_flops

    torch.set_num_threads(threads)
    mm = mm_flops(threads)
    kf = kernel_rate(1024)
    kb = kernel_rate(1024, backward=True)
    return dict(mm_flops=mm, kernel_fwd_flops=kf, kernel_bwd_flops=kb, fwd_fraction=kf / mm, bwd_fraction=kb / mm)


def main(args: argparse.Namespace) -> int:
    from ringrt.simulate import costmodel as cm
    from ringrt.simulate.calibrate import calibrate, write
    from ringrt.spawn import run_local

    worlds = args.worlds or [1, 2, 4]
    seqs = args.seqs or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    reps = args.reps or (1 if args.quick else 2)
    heads_cases = [(16, 16, 32), (16, 4, 32)] if args.quick else [(32, 32, 32), (32, 8, 32)]
    modes = ["fwd", "fwd+bwd"]
    grid = [(s, h, hk, d, c, mo) for s in seqs for (h, hk, d) in heads_cases for c in (True, False) for mo in modes
            if not (args.quick and not c and mo == "fwd+bwd")]
    args.out.mkdir(parents=True, exist_ok=True)
    print("calibrating ...", flush=True)
    machine, measured = calibrate(1, 3)
    write(args.out / "calibration.json", machine, measured)
    os.environ["RINGRT_CALIBRATION"] = str((args.out / "calibration.json").resolve())  # what auto reads in the ranks
    roof = _roofline(1)
    rows = []
    for w in worlds:
        print(f"W={w} ...", flush=True)
        for res in [run_local(_worker, w, grid, reps, timeout=3600, threads=1)]:
            by_key: dict = {}
            for rank_rows in res:
                for r in rank_rows:
                    key = tuple(r[k] for k in ("world", "seq", "heads", "kv_heads", "causal", "mode", "name"))
                    cur = by_key.setdefault(key, dict(r))
                    if "time" in r and "time" in cur:
                        cur["time"] = max(cur["time"], r["time"])
                        cur["rss"] = max(cur["rss"], r["rss"])
                        if r.get("bytes_sent") is not None:
                            cur["bytes_sent"] = max(cur["bytes_sent"], r["bytes_sent"])
            rows.extend(by_key.values())
    single = {(r["seq"], r["heads"], r["kv_heads"], r["causal"], r["mode"]): r["time"] for r in rows if r["name"] == "single" and "time" in r}
    for r in rows:
        if "time" not in r:
            continue
        base = single.get((r["seq"], r["heads"], r["kv_heads"], r["causal"], r["mode"]))
        r["efficiency"] = base / (r["world"] * r["time"]) if base else None
        sched = r["name"] if r["name"] in cm.SCHEDULES else ("ulysses" if r["name"] == "deepspeed" else None)
        if r["name"] == "single":
            sched = "ring"
        if sched:
            p = cm.Problem(seq=r["seq"], heads=r["heads"], kv_heads=r["kv_heads"], head_dim=r["head_dim"], dtype_bytes=4,
                           causal=r["causal"], backward=r["mode"] == "fwd+bwd",
                           layout="contiguous" if (r["name"] == "deepspeed" or not r["causal"]) else "zigzag")
            try:
                r["model"] = cm.estimate(sched, p, machine, r["world"]).total
                r["model_err"] = r["model"] / r["time"] - 1
            except ValueError:
                pass
    result = {"machine": cm.machine_to_dict(machine), "calibration": measured, "roofline": roof, "rows": rows,
              "targets": _targets(rows)}
    tmp = args.out / f"compare.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, args.out / "compare.json")
    _print(result)
    _plot(result, args.out / "compare.png")
    print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
    return 0


def _targets(rows) -> dict:
    groups: dict = {}
    for r in rows:
        if "time" in r and r["world"] > 1:
            groups.setdefault((r["world"], r["seq"], r["heads"], r["kv_heads"], r["causal"], r["mode"]), {})[r["name"]] = r["time"]
    tr_wins = tr_total = auto_wins = auto_total = 0
    for (w, s, h, hk, c, mo), t in groups.items():
        peers = {n: x for n, x in t.items() if n not in ("tokenring", "auto")}
        if not peers:
            continue
        if h == hk and "tokenring" in t:
            tr_total += 1
            tr_wins += t["tokenring"] <= min(peers.values())
        if "auto" in t:
            auto_total += 1
            auto_wins += t["auto"] <= min(peers.values())
    errs = [abs(r["model_err"]) for r in rows if "model_err" in r]
    return {"tokenring_best_on_mha": f"{tr_wins}/{tr_total}", "auto_at_least_best_peer": f"{auto_wins}/{auto_total}",
            "model_within_20pct": f"{sum(e <= 0.2 for e in errs)}/{len(errs)}"}


def _print(result) -> None:
    roof = result["roofline"]
    print(f"\nroofline (1 thread): torch.mm {roof['mm_flops'] / 1e9:.1f} GFLOP/s; kernel fwd {roof['kernel_fwd_flops'] / 1e9:.1f} "
          f"({roof['fwd_fraction']:.2f} of mm), bwd {roof['kernel_bwd_flops'] / 1e9:.1f} ({roof['bwd_fraction']:.2f})")
    hdr = f"{'W':>2} {'seq':>5} {'H/Hkv':>6} {'causal':>6} {'mode':>7} {'schedule':>10} {'ms':>9} {'eff':>5} {'MB/rank':>8} {'RSS MB':>7} {'model ms':>9} {'err':>6}"
    print(hdr)
    for r in result["rows"]:
        head = f"{r['world']:>2} {r['seq']:>5} {r['heads']:>3}/{r['kv_heads']:<2} {str(r['causal']):>6} {r['mode']:>7} {r['name']:>10}"
        if "time" not in r:
            print(f"{head}   skipped: {r['skipped']}")
            continue
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") else "-"
        mb = f"{r['bytes_sent'] / 1e6:.2f}" if r.get("bytes_sent") is not None else "n/a"
        model = f"{r['model'] * 1e3:9.1f} {r['model_err']:+6.0%}" if "model" in r else f"{'-':>9} {'-':>6}"
        print(f"{head} {r['time'] * 1e3:9.1f} {eff:>5} {mb:>8} {r['rss'] / 1e6:7.1f} {model}")
    print("targets:", result["targets"])


def _plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "time" in r]
    cases = sorted({(r["heads"], r["kv_heads"], r["causal"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(4 * max(1, len(cases)), 4), squeeze=False)
    for ax, (h, hk, c, mo) in zip(axes[0], cases):
        sel = [r for r in rows if (r["heads"], r["kv_heads"], r["causal"], r["mode"]) == (h, hk, c, mo)]
        seq = max(r["seq"] for r in sel)
        for name in sorted({r["name"] for r in sel}):
            pts = sorted((r["world"], r["time"] * 1e3) for r in sel if r["name"] == name and r["seq"] == seq)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(f"{h}/{hk} heads, {'causal' if c else 'full'}, {mo}, S={seq}", fontsize=8)
        ax.set_xlabel("W (gloo ranks, CPU)")
        ax.set_ylabel("ms (measured)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
