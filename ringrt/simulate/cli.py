"""``ringrt simulate {calibrate, anchors, project}``: the cost model from the command line.

* ``calibrate``: measure this machine (kernel FLOP/s, merge bandwidth, gloo latency/bandwidth/overlap)
  and write the calibration ``auto`` and the benchmarks read.
* ``anchors``: the published measurements the model must reproduce, with their bands.
* ``regimes``: the ``--link`` rates that give this CPU a published GPU regime's FLOPs per link byte.
* ``project``: every schedule from 8 to 1024 GPUs, MHA and GQA; JSON + PNG with the crossovers.

GPU numbers are SIMULATION from the presets in ``costmodel.PRESETS``, not measurements.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..run.rundir import atomic_write_json
from ..schedules import costmodel as cm
from ..schedules.auto import calibration_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("calibrate", help="measure this machine and write the calibration JSON")
    c.add_argument("--out", type=Path, default=None,
                   help=f"calibration JSON to write, read by algorithm='auto' (default {calibration_path()})")
    c.add_argument("--threads", type=int, default=1, help="intra-op threads per rank while measuring (default %(default)s)")
    c.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement; the best is kept (default %(default)s)")
    c.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes whose per-call overheads are measured")
    c.add_argument("--link", default=None, metavar="rate=R,burst=B[,latency=L][,delay=D]",
                   help="measure gloo over emulated links: each rank in its own network namespace, tbf-shaped (root only)")
    c.add_argument("--topology", choices=["mesh", "switch", "ring"], default=None,
                   help="how the emulated links join the ranks (with --link; default mesh)")
    sub.add_parser("anchors", help="reproduce the published anchors (simulation)")
    rg = sub.add_parser("regimes", help="emulated link rates that give this CPU a GPU regime's FLOPs per link byte")
    rg.add_argument("--calibration", type=Path, default=None,
                    help=f"calibration JSON whose kernel FLOP/s to use (default {calibration_path()}; uncalibrated defaults without one)")
    pr = sub.add_parser("project", help="project 8 -> 1024 GPUs, MHA and GQA (simulation)")
    pr.add_argument("--machine", choices=sorted(cm.PRESETS), default="h100",
                    help="GPU preset the projection prices (simulation; default %(default)s)")
    pr.add_argument("--out", type=Path, default=Path("bench_results"),
                    help="folder for projection.json and projection.png (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    if args.action == "regimes":
        return _regimes(args)
    if args.action == "calibrate":
        return _calibrate(args)
    if args.action == "anchors":
        from .anchors import all_anchors

        bad = 0
        print(f"{'anchor (SIMULATION)':44s} {'model':>8s} {'published':>10s} {'band':>14s}")
        for a in all_anchors():
            bad += not a.ok
            print(f"{a.name:44s} {a.value:8.3f} {a.published:>10s} {str(a.band):>14s} {'ok' if a.ok else 'OUT OF BAND'}")
        return 1 if bad else 0
    from .project import plot, project

    res = project(args.machine)
    atomic_write_json(args.out / "projection.json", res, sort_keys=False)
    plot(res, args.out / "projection.png")
    for case, by_seq in res["cases"].items():
        for seq, d in by_seq.items():
            best = ", ".join(f"{w}:{b}" for w, b in zip(res["worlds"], d["best"], strict=True))
            cross = "; ".join(f"{c['from']}→{c['to']} at {c['world']}" for c in d["crossovers"]) or "none"
            pair = "; ".join(f"{c['from']}→{c['to']} at {c['world']}" for c in d["tokenring_vs_ring_crossovers"]) or "none"
            print(f"{case} {int(seq) // 1024}K: best by GPUs {best} | crossovers: {cross} | "
                  f"tokenring vs ring: {d['tokenring_vs_ring'][0]} at 8, crossovers: {pair}")
    print(f"wrote {args.out / 'projection.json'} and {args.out / 'projection.png'} (SIMULATION)")
    return 0


def _regimes(args: argparse.Namespace) -> int:
    from ..schedules.auto import load_machine
    from .regimes import table

    m = load_machine(args.calibration)
    print(f"this CPU: {m.peak / 1e9:.1f} GFLOP/s per rank (kernel forward, {m.name}); GPU side: SIMULATION presets")
    print(f"{'regime':38} {'GPU TFLOP/s':>11} {'link GB/s':>9} {'FLOP/B':>7} {'-> MB/s':>8}  --link / --topology")
    for r in table(m):
        print(f"{r['regime']:38} {r['gpu_tflops']:11.0f} {r['gpu_link_GBs']:9.1f} {r['flop_per_byte']:7.0f} "
              f"{r['rate_MBs']:8.2f}  --link {r['link']} --topology {r['topology']}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from . import links as ln
    from .calibrate import calibrate, write

    net = contextlib.nullcontext()
    if args.link or args.topology:
        try:
            if not args.link:
                raise ln.LinkError("--topology needs --link (e.g. --link rate=200mbit,burst=64kb)")
            net = ln.Network(max([2, *args.worlds]), args.topology or "mesh", ln.parse_link(args.link))
            ln.check_privileges(net.link)
        except ln.LinkError as e:
            print(f"ringrt simulate calibrate: {e}", file=sys.stderr)
            return 2
    with net:  # the ranks' gloo traffic runs over the emulated links
        m, measured = calibrate(args.threads, args.reps, tuple(args.worlds), net.topology if args.link else None)
    if args.link:
        measured["link_emulation"] = {"topology": net.topology, **net.link.to_dict()}
        m.source += f" over emulated {net.topology} links ({args.link})"
    path = args.out or calibration_path()
    write(path, m, measured)
    loc, link = measured["local"], measured["link"]
    print(f"kernel fwd {loc['rate_large'] / 1e9:.1f} GFLOP/s at 1024 rows ({loc['rate_small'] / 1e9:.1f} at 128), "
          f"bwd {m.bwd_peak / 1e9:.1f}; torch.mm {loc['mm_flops'] / 1e9:.1f} GFLOP/s "
          f"(kernel/mm = {loc['rate_large'] / loc['mm_flops']:.2f})")
    print(f"merge {m.mem_bw / 1e9:.1f} GB/s; gloo {link['bandwidth'] / 1e9:.2f} GB/s, {link['latency'] * 1e3:.3f} ms/op, "
          f"overlap {link['overlap']:.2f}")
    for r in loc["per_head_dim"]:
        print(f"  D={r['head_dim']:<4d} fwd {r['rate_large'] / 1e9:6.1f} GFLOP/s at 1024 rows ({r['rate_small'] / 1e9:.1f} at 128), "
              f"m_half {r['m_half']:.0f}, bwd peak {r['bwd_peak'] / 1e9:.1f}")
    print("  compute slowdown with n ranks at once, ring steps: "
          + ", ".join(f"{x.ranks}: {x.factor:.2f}" for x in m.slowdowns)
          + "; single bursts: " + ", ".join(f"{x.ranks}: {x.factor:.2f}" for x in m.burst_slowdowns))
    linear = {(f.schedule, f.world, f.backward): f.seconds_per_byte for f in m.linear_costs}
    for c in m.call_overheads:
        f = linear.get((c.schedule, c.world, c.backward))
        print(f"  per-call overhead {c.schedule:>9s} W={c.world} {'fwd+bwd' if c.backward else 'fwd':7s} {c.seconds * 1e3:6.2f} ms"
              + (f", + {f * 1e9:.2f} ms per MB of q, k, v shards" if f is not None else ""))
    print(f"wrote {path}")
    return 0
