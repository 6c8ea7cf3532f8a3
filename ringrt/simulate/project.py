"""Projection of every schedule from 8 to 1024 GPUs (simulation; cost model on a preset machine)."""

from __future__ import annotations

from ..schedules import costmodel as cm

WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024)
CASES = {  # name -> (heads, kv_heads)
    "MHA 32/32": (32, 32),
    "GQA 32/8": (32, 8),
}
SEQS = (128 * 1024, 1024 * 1024)


def project(machine: str = "h100", backward: bool = True) -> dict:
    """{case: {seq: {schedule: [seconds per world or None]}, "best": [...], "crossovers": [...]}}."""
    m = cm.PRESETS[machine]
    out: dict = {"machine": cm.machine_to_dict(m), "worlds": list(WORLDS), "cases": {}}
    for case, (h, hkv) in CASES.items():
        out["cases"][case] = {}
        for seq in SEQS:
            p = cm.Problem(seq=seq, heads=h, kv_heads=hkv, head_dim=128, dtype_bytes=2, causal=True, backward=backward)
            times = {s: [] for s in cm.SCHEDULES}
            best = []
            for w in WORLDS:
                cands = cm.candidates(p, w, m.ranks_per_node)
                row = {}
                for s in cm.SCHEDULES:
                    t = cm.estimate(s, p, m, w).total if s in cands else None
                    times[s].append(t)
                    if t is not None:
                        row[s] = t
                best.append(min(row, key=row.get))
            cross = [{"world": WORLDS[i], "from": best[i - 1], "to": best[i]} for i in range(1, len(WORLDS)) if best[i] != best[i - 1]]
            tr_vs_ring = ["tokenring" if a <= b else "ring" for a, b in zip(times["tokenring"], times["ring"], strict=True)]
            pair = [{"world": WORLDS[i], "from": tr_vs_ring[i - 1], "to": tr_vs_ring[i]}
                    for i in range(1, len(WORLDS)) if tr_vs_ring[i] != tr_vs_ring[i - 1]]
            out["cases"][case][str(seq)] = {"times": times, "best": best, "crossovers": cross,
                                            "tokenring_vs_ring": tr_vs_ring, "tokenring_vs_ring_crossovers": pair,
                                            "single_gpu": cm.single_device(p, m)}
    return out


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), len(SEQS), figsize=(12, 8), squeeze=False)
    for i, (case, by_seq) in enumerate(cases.items()):
        for j, seq in enumerate(SEQS):
            ax = axes[i][j]
            d = by_seq[str(seq)]
            for s, ts in d["times"].items():
                xs = [w for w, t in zip(result["worlds"], ts, strict=True) if t is not None]
                ys = [t * 1e3 for t in ts if t is not None]
                if xs:
                    ax.plot(xs, ys, marker="o", label=s)
            for c in d["crossovers"]:
                ax.axvline(c["world"], color="grey", ls=":", lw=1)
                ax.annotate(f"{c['from']}→{c['to']}", (c["world"], ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{case}, {seq // 1024}K tokens (SIMULATION)", fontsize=9)
            ax.set_xlabel("GPUs")
            ax.set_ylabel("fwd+bwd ms (model)")
            ax.legend(fontsize=7)
    fig.suptitle(f"Cost-model projection on {result['machine']['name']} — simulation, not measurement", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
