"""``ringrt bench compare``: every schedule and the outside peers, side by side, on this machine.

Runs (CPU, gloo, 1 thread per rank) W = 1, 2, 4 x MHA/GQA x sequence lengths x forward / forward +
backward: tokenring, ring, allgather, ulysses, hybrid, auto; DeepSpeed's ``DistributedAttention``
(Ulysses; contiguous shards, if deepspeed is installed); torch's ``context_parallel`` (non-causal
forward only: all it supports on CPU); one process (``single``: the block kernel on the whole
sequence). Within one configuration the contenders run round-robin (one warm-up round, then
``--reps`` rounds), so machine noise hits them alike; a round's time is its makespan, from the first
rank's start to the last rank's end on the host's shared monotonic clock. A row's
time is the best round (as ``timeit`` advises: noise only ever adds time, and on this 2-core box it
adds whole scheduler ticks of 4 ms to millisecond calls); the median round is reported beside it and
the targets are also counted on medians. Reports that time, parallel efficiency (single / (W x time)),
bytes sent per rank (ringrt's counters; peers: n/a), peak RSS growth per rank, the cost model's
prediction (calibrated at the start of the run, per-call overheads included; ``auto`` priced as the
schedule it picks, ``single`` as one kernel call, DeepSpeed as ringrt's Ulysses) with its error per
row and the share of rows within ±20 % in total and per world size, and the kernel's FLOP/s as a
fraction of torch.mm's on the same thread (the roofline). Writes JSON + PNG under ``--out``.

``--link rate=200mbit,burst=64kb --topology mesh|switch|ring`` puts every rank in a network namespace
of its own joined by tbf-shaped links (``ringrt.simulate.links``; needs root), calibrates under the same
links, and reports per contender the bytes of every link direction in its last round, the busiest
one's bytes and its busy fraction (bytes / (rate x that round's time)) beside ringrt's own counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..run.rundir import atomic_write_text

OURS = ("tokenring", "ring", "allgather", "ulysses", "hybrid", "auto")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small grid: 1-2K tokens, 16 heads (about 5 min on an idle 2-core box, the ~40 s calibration included)")
    p.add_argument("--worlds", type=int, nargs="+", default=None)
    p.add_argument("--seqs", type=int, nargs="+", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--heads", nargs="+", default=None, metavar="H/HKV/D",
                   help="head cases, e.g. 12/12/64 (default 32/32/32 32/8/32; --quick 16/16/32 16/4/32)")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--masks", nargs="+", choices=["causal", "full"], default=["causal", "full"])
    p.add_argument("--link", default=None, metavar="rate=R,burst=B[,latency=L][,delay=D]",
                   help="emulate links: each rank in its own network namespace, links shaped with tbf (root only)")
    p.add_argument("--topology", choices=["mesh", "switch", "ring"], default=None,
                   help="how the emulated links join the ranks (with --link; default mesh)")


class _PeakRSS:
    """Peak RSS growth of this process over a ``with`` block, in bytes (``peak - base``).

    Linux keeps the high-water mark (VmHWM) and resets it to the current RSS when ``5`` is written
    to ``/proc/self/clear_refs``, so the peak is exact and costs nothing while the block runs (a
    sampling thread would compete with the ranks for the GIL and the cores). Elsewhere: 0.
    """

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._ok = True
        except OSError:
            self._ok = False
        self.base = self.peak = self._field("VmRSS") if self._ok else 0
        return self

    @staticmethod
    def _field(name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __exit__(self, *exc):
        if self._ok:
            self.peak = max(self.base, self._field("VmHWM"))


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


def _deepspeed_attention(world):
    """DeepSpeed's ``DistributedAttention`` over the whole group, or why it cannot run here (a
    string, reported as the reason its rows are skipped); None on one rank."""
    import torch.distributed as dist

    if world == 1:
        return None
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend="gloo")

        def local(q_, k_, v_, *a, **kw):
            return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                  is_causal=kw.get("causal", True), enable_gqa=True).transpose(1, 2)

        return DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    except Exception as e:  # not installed or not usable here: reported as skipped
        return repr(e)[:120]


def _rounds(runnable, reps, world, rank, seq, heads, kv_heads, d, causal, grad, ds_attn, links=False) -> dict:
    """Round 0 warms every contender up, then ``reps`` measured rounds, round-robin. Returns
    ``spans`` ((start, end) per measured round), ``rss`` (largest peak growth) and ``sent`` (bytes
    of the last round) per contender, ``errors`` (the first failure of a contender, which then sits
    out the remaining rounds), ``ran`` (what auto ran, and what it measured when it tuned) and, with
    emulated ``links``, ``io`` ((rx, tx) bytes per link interface of this rank's namespace in the last round)."""
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in runnable}  # (start, end) per round
    ran: dict = {}
    rss = dict.fromkeys(runnable, 0)
    sent = dict.fromkeys(runnable, 0)
    io = dict.fromkeys(runnable)
    errors: dict[str, str] = {}
    for i in range(reps + 1):  # round 0 warms up every contender
        for name in runnable:
            if name in errors:
                continue
            try:
                span, peak, nbytes, delta = _run_once(name, world, rank, seq, heads, kv_heads, d, causal, grad, ds_attn, links)
            except Exception as e:
                errors[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
                continue
            if name == "auto":
                _note_auto_choice(ran)
            if i > 0:
                times[name].append(span)
                rss[name] = max(rss[name], peak)
                sent[name] = nbytes
                io[name] = delta
    return dict(spans=times, rss=rss, sent=sent, errors=errors, ran=ran, io=io)


def _note_auto_choice(ran: dict) -> None:
    """Record in ``ran`` the schedule auto's last call ran and, from its first call, what it measured."""
    from ringrt.schedules.auto import last_choice

    choice = last_choice()
    if choice is not None:
        ran["auto_ran"] = choice[0]
        ran.setdefault("auto_measured", choice[1])


def _worker(rank, world, grid, reps, links=False):
    ds_attn = _deepspeed_attention(world)
    rows = []
    for seq, heads, kv_heads, d, causal, mode in grid:
        names = ["single"] if world == 1 else [*OURS, "deepspeed", "torch_cp"]
        cfg = dict(world=world, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=d, causal=causal, mode=mode)
        runnable = []
        for name in names:
            skip = _skip_reason(name, world, heads, kv_heads, causal, mode, ds_attn)
            if skip:
                rows.append(dict(cfg, name=name, skipped=skip))
            else:
                runnable.append(name)
        got = _rounds(runnable, reps, world, rank, seq, heads, kv_heads, d, causal, mode == "fwd+bwd", ds_attn, links)
        for name in runnable:
            if name in got["errors"]:
                rows.append(dict(cfg, name=name, skipped=got["errors"][name]))
                continue
            rows.append(dict(cfg, name=name, spans=got["spans"][name], rss=got["rss"][name],
                             bytes_sent=got["sent"][name] if name not in ("deepspeed", "torch_cp") else None,
                             **(got["ran"] if name == "auto" else {}), **({"link_io": {rank: got["io"][name]}} if links else {})))
    return rows


def _skip_reason(name, world, heads, kv_heads, causal, mode, ds_attn) -> str | None:
    if name == "torch_cp" and (causal or mode != "fwd"):
        return "torch context_parallel on CPU: non-causal forward only"
    if name == "deepspeed" and not callable(ds_attn):
        return f"deepspeed unavailable: {ds_attn}"
    if name == "ulysses" and (heads % world or (kv_heads % world and world % kv_heads)):
        return "heads do not split over W"
    return None


def _run_once(name, world, rank, seq, heads, kv_heads, d, causal, grad, ds_attn, links=False):
    """((start, end) on the host's monotonic clock, peak RSS growth, bytes sent by ringrt, and with
    emulated ``links`` the (rx, tx) bytes of this rank's link interfaces, else None) of one call of
    ``name`` on fresh inputs."""
    from ringrt.simulate.links import interface_bytes, io_delta

    import torch.distributed as dist

    from ringrt.distributed import comm

    layout = "contiguous" if (name == "deepspeed" or not causal) else "zigzag"
    if name == "torch_cp":
        q, k, v = _inputs(1, rank, seq, heads, kv_heads, d, "full", False)
    else:
        q, k, v = _inputs(world, rank, seq, heads, kv_heads, d, layout, grad)
    if name == "deepspeed":
        ds_attn.local_attn = _causal_local(causal)
    if world > 1:
        dist.barrier()
    comm.reset_stats()
    io0 = interface_bytes() if links else None
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        out = _call(name, q, k, v, causal, world, ds_attn)
        if grad:
            out.backward(torch.ones_like(out))
        t1 = time.perf_counter()
    sent = sum(c.bytes_sent for n, c in comm.stats().items() if n != "auto")
    return (t0, t1), mem.peak - mem.base, sent, io_delta(io0, interface_bytes()) if links else None


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
    from ringrt.schedules import costmodel as cm
    from ringrt.simulate.calibrate import calibrate, write
    from ringrt.distributed.spawn import run_local
    from ringrt.simulate import links as ln

    worlds = args.worlds or [1, 2, 4]
    seqs = args.seqs or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    reps = args.reps or 5
    heads_cases = ([tuple(int(x) for x in h.split("/")) for h in args.heads] if args.heads else
                   [(16, 16, 32), (16, 4, 32)] if args.quick else [(32, 32, 32), (32, 8, 32)])
    modes = args.modes
    masks = [c == "causal" for c in args.masks]
    grid = [(s, h, hk, d, c, mo) for s in seqs for (h, hk, d) in heads_cases for c in masks for mo in modes
            if not (args.quick and not c and mo == "fwd+bwd")]
    link = topology = None
    if args.link or args.topology:
        try:
            if not args.link:
                raise ln.LinkError("--topology needs --link (e.g. --link rate=200mbit,burst=64kb)")
            link, topology = ln.parse_link(args.link), args.topology or "mesh"
            ln.check_privileges(link)
        except ln.LinkError as e:
            print(f"ringrt bench compare: {e}", file=sys.stderr)
            return 2

    def network(w):  # the emulated links for w ranks, or nothing
        return ln.Network(w, topology, link) if link and w > 1 else contextlib.nullcontext()

    args.out.mkdir(parents=True, exist_ok=True)
    print("calibrating ..." + (f" (under {topology} links, {args.link})" if link else ""), flush=True)
    with network(max([2, *worlds])):
        machine, measured = calibrate(1, 3, tuple(w for w in worlds if w > 1), topology)
    write(args.out / "calibration.json", machine, measured)
    os.environ["RINGRT_CALIBRATION"] = str((args.out / "calibration.json").resolve())  # what auto reads in the ranks
    roof = _roofline(1)
    rows = []
    for w in worlds:
        print(f"W={w} ...", flush=True)
        with network(w) as net:
            got = _merge_ranks(run_local(_worker, w, grid, reps, net is not None, timeout=3600, threads=1))
        for r in got:
            io = r.pop("link_io", None)
            if io is not None and "times" in r:  # counters of the last round: priced against that round's time
                r.update(net.summary(io, r["times"][-1]))
        rows.extend(got)
    single = {(r["seq"], r["heads"], r["kv_heads"], r["causal"], r["mode"]): r["time"] for r in rows if r["name"] == "single" and "time" in r}
    for r in rows:
        if "time" not in r:
            continue
        base = single.get((r["seq"], r["heads"], r["kv_heads"], r["causal"], r["mode"]))
        r["efficiency"] = base / (r["world"] * r["time"]) if base else None
        _price(r, machine)
    result = {"machine": cm.machine_to_dict(machine), "calibration": measured, "roofline": roof, "rows": rows,
              "targets": _targets(rows), "model_agreement": _agreement(rows),
              "link_emulation": {"topology": topology, **link.to_dict()} if link else None}
    atomic_write_text(args.out / "compare.json", json.dumps(result, indent=1, default=str))
    _print(result)
    _plot(result, args.out / "compare.png")
    print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
    return 0


def _merge_ranks(res: list[list[dict]]) -> list[dict]:
    """One row per (configuration, contender): a round's time is its makespan (first rank's start to
    last rank's end, :func:`ringrt.distributed.spawn.makespans`); the row's time is the best round, ``median`` the
    median round."""
    by_key: dict = {}
    for rank_rows in res:
        for r in rank_rows:
            key = tuple(r[k] for k in ("world", "seq", "heads", "kv_heads", "causal", "mode", "name"))
            cur = by_key.get(key)
            if cur is None:
                by_key[key] = dict(r)
                continue
            if "spans" in r and "spans" in cur:
                cur["spans"] = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(cur["spans"], r["spans"], strict=True)]
                cur["rss"] = max(cur["rss"], r["rss"])
                if "link_io" in r:
                    cur["link_io"] = {**cur.get("link_io", {}), **r["link_io"]}
                if r.get("bytes_sent") is not None:
                    cur["bytes_sent"] = max(cur["bytes_sent"], r["bytes_sent"])
            elif "skipped" in r:
                cur.pop("spans", None)
                cur["skipped"] = r["skipped"]
    for r in by_key.values():
        if "spans" in r:
            r["times"] = [b - a for a, b in r.pop("spans")]
            r["time"] = min(r["times"])
            r["median"] = statistics.median(r["times"])
    return list(by_key.values())


def _price(r: dict, machine) -> None:
    """The model's time for row ``r`` (``model``, ``model_err``; ``auto`` is priced as the schedule it
    ran, and ``model_pick`` is the model's own first choice)."""
    from ringrt.schedules.auto import choose
    from ringrt.schedules.hybrid import degree_setting
    from ringrt.schedules import costmodel as cm

    layout = "contiguous" if (r["name"] == "deepspeed" or not r["causal"]) else "zigzag"
    p = cm.Problem(seq=r["seq"], heads=r["heads"], kv_heads=r["kv_heads"], head_dim=r["head_dim"], dtype_bytes=4,
                   causal=r["causal"], backward=r["mode"] == "fwd+bwd", layout=layout)
    try:
        if r["name"] == "single":
            r["model"] = cm.single_device(p, machine)
        elif r["name"] == "auto":
            r["model_pick"], ests = choose(p, machine, r["world"], ulysses_degree=degree_setting(r["world"]))
            ran = r.get("auto_ran", r["model_pick"])
            r["model"] = next((e.total for e in ests if e.schedule == ran), ests[0].total)
        elif r["name"] in cm.SCHEDULES or r["name"] == "deepspeed":
            name = "ulysses" if r["name"] == "deepspeed" else r["name"]
            r["model"] = cm.estimate(name, p, machine, r["world"], ulysses_degree=degree_setting(r["world"])).total
        else:
            return
    except ValueError:
        return
    r["model_err"] = r["model"] / r["time"] - 1


def _agreement(rows) -> dict:
    """Rows whose model time is within ±20 % of the best measured round: in total, per W, per contender."""
    out: dict = {}
    for r in rows:
        if "model_err" not in r:
            continue
        ok = abs(r["model_err"]) <= 0.2
        for key in ("total", f"W={r['world']}", r["name"]):
            hit, n = out.get(key, (0, 0))
            out[key] = (hit + ok, n + 1)
    return {k: f"{h}/{n}" for k, (h, n) in out.items()}


def _targets(rows) -> dict:
    """The issue's targets, counted on the best round (``time``) and on the median round, and within
    noise: a configuration's noise is the median over its contenders of (median round / best round
    - 1), and a contender within that fraction of the fastest peer counts as a tie."""
    out = {}
    configs: dict = {}
    for r in rows:
        if "time" in r and r["world"] > 1:
            key = (r["world"], r["seq"], r["heads"], r["kv_heads"], r["causal"], r["mode"])
            configs.setdefault(key, {})[r["name"]] = r
    for stat, suffix in (("time", ""), ("median", " (medians)"), ("noise", " (within noise)")):
        tr_wins = tr_total = auto_wins = auto_total = 0
        for (_, _, h, hk, _, _), t in configs.items():
            val = "median" if stat == "median" else "time"
            peers = {n: r[val] for n, r in t.items() if n not in ("tokenring", "auto")}
            if not peers:
                continue
            slack = 1.0
            if stat == "noise":
                slack += statistics.median(r["median"] / r["time"] - 1.0 for r in t.values())
            best = min(peers.values()) * slack
            if h == hk and "tokenring" in t:
                tr_total += 1
                tr_wins += t["tokenring"][val] <= best
            if "auto" in t:
                auto_total += 1
                auto_wins += t["auto"][val] <= best
        out["tokenring_best_on_mha" + suffix] = f"{tr_wins}/{tr_total}"
        out["auto_at_least_best_peer" + suffix] = f"{auto_wins}/{auto_total}"
    errs = [abs(r["model_err"]) for r in rows if "model_err" in r and r["name"] != "auto"]
    out["model_within_20pct"] = f"{sum(e <= 0.2 for e in errs)}/{len(errs)}"
    return out


def _print(result) -> None:
    roof = result["roofline"]
    print(f"\nroofline (1 thread): torch.mm {roof['mm_flops'] / 1e9:.1f} GFLOP/s; kernel fwd {roof['kernel_fwd_flops'] / 1e9:.1f} "
          f"({roof['fwd_fraction']:.2f} of mm), bwd {roof['kernel_bwd_flops'] / 1e9:.1f} ({roof['bwd_fraction']:.2f})")
    em = result.get("link_emulation")
    if em:
        print(f"emulated links: {em['topology']}, tbf rate {em['rate']} ({em['bytes_per_s'] / 1e6:.1f} MB/s per direction), "
              f"burst {em['burst']}, latency {em['latency']}" + (f", delay {em['delay']}" if em.get("delay") else "")
              + "; link MB = busiest link direction's bytes in the last round, busy = those bytes / (rate x that round's time)")
    hdr = f"{'W':>2} {'seq':>5} {'H/Hkv':>6} {'causal':>6} {'mode':>7} {'schedule':>10} {'best ms':>9} {'median':>8} {'eff':>5} {'MB/rank':>8} {'RSS MB':>7} {'model ms':>9} {'err':>6}"
    if em:
        hdr += f"    {'link MB':>8} {'busy':>5} {'busiest':>7}"
    print(hdr)
    for r in result["rows"]:
        head = f"{r['world']:>2} {r['seq']:>5} {r['heads']:>3}/{r['kv_heads']:<2} {str(r['causal']):>6} {r['mode']:>7} {r['name']:>10}"
        if "time" not in r:
            print(f"{head}   skipped: {r['skipped']}")
            continue
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") else "-"
        mb = f"{r['bytes_sent'] / 1e6:.2f}" if r.get("bytes_sent") is not None else "n/a"
        model = f"{r['model'] * 1e3:9.1f} {r['model_err']:+6.0%} {'ok' if abs(r['model_err']) <= 0.2 else '--'}" if "model" in r else f"{'-':>9} {'-':>6}"
        pick = ""
        if r["name"] == "auto":
            tuned = " tuned" if r.get("auto_measured") else ""
            pick = f" -> {r.get('auto_ran', '?')}{tuned} (model: {r.get('model_pick', '?')})"
        link = ""
        if em:
            link = (f" {r['busiest_link_bytes'] / 1e6:8.2f} {r['busy']:5.2f} {r['busiest_link']:>7}" if r.get("busiest_link")
                    else f" {'-':>8} {'-':>5} {'-':>7}")
            model = f"{model:<19}"
        print(f"{head} {r['time'] * 1e3:9.1f} {r['median'] * 1e3:8.1f} {eff:>5} {mb:>8} {r['rss'] / 1e6:7.1f} {model}{link}{pick}")
    print("targets:", result["targets"])
    print("model within ±20 % of the best measured round:", result["model_agreement"])


def _plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "time" in r]
    cases = sorted({(r["heads"], r["kv_heads"], r["causal"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(4 * max(1, len(cases)), 4), squeeze=False)
    # with no case the figure still has its one (empty) axis: zip stops at the cases
    for ax, (h, hk, c, mo) in zip(axes[0], cases, strict=False):
        sel = [r for r in rows if (r["heads"], r["kv_heads"], r["causal"], r["mode"]) == (h, hk, c, mo)]
        seq = max(r["seq"] for r in sel)
        for name in sorted({r["name"] for r in sel}):
            pts = sorted((r["world"], r["time"] * 1e3) for r in sel if r["name"] == name and r["seq"] == seq)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_title(f"{h}/{hk} heads, {'causal' if c else 'full'}, {mo}, S={seq}", fontsize=8)
        ax.set_xlabel("W (gloo ranks, CPU)")
        ax.set_ylabel("ms (measured)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
