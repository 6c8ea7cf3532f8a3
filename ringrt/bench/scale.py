"""``ringrt bench scale``: one sequence's fwd+bwd of the demo model as the sequence grows.

For each attention (the Λ-mask, and exact causal TokenRing as "dense"), each world size W and each
total length N: wall time of one forward + backward (model with per-layer checkpointing, LM head
and loss in chunks, unless switched off), the peak resident memory of every rank, and the bytes
each rank sent + received. Every point runs in freshly spawned processes, so no peak carries over
from an earlier point: a rank reads its VmRSS once the model and the tokens are built (``base``)
and its VmHWM (the high-water mark of the resident set) after the backward (``peak``); ``act`` =
peak - base is what the pass added. The analytic count of ``ringrt.model.memory`` is printed
next to it (``act / formula`` is the check: within 1.5x).

Printed checks: per (attention, W), time per token at the largest N over the smallest (flat for
the Λ-mask: its work per token does not grow with N; dense grows ~N).

Points whose analytic peak per rank exceeds ``--mem-cap-gib`` are skipped (with a line saying so),
and dense points above ``--dense-max`` tokens too (dense time grows as N^2).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..distributed import comm
from ..distributed.spawn import run_local
from ..jobs.config import DemoConfig
from ..model.config import AttentionConfig, ModelConfig
from ..model.memory import activation_bytes_per_token
from ..model.parallel import chunked_sequence_loss, make_attend, sequence_loss, shard_batch
from .report import write_json

ATTENTIONS = ("lambda", "dense")
WARM_UP = 1024  # tokens per rank of the warm-up pass
GIB = 2**30


def demo_model_config() -> ModelConfig:
    """The demo's model, as ``ringrt demo`` trains it: 4 layers, hidden 128, 4 heads / 2 kv heads,
    head_dim 32, SwiGLU 384, bytes."""
    return DemoConfig().model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536], help="total sequence lengths N")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes W (ranks on this machine)")
    p.add_argument("--attention", choices=ATTENTIONS, nargs="+", default=list(ATTENTIONS), help="which attentions to run")
    p.add_argument("--n-global", type=int, default=8, help="Λ-mask: leading tokens every query sees")
    p.add_argument("--n-local", type=int, default=256, help="Λ-mask: local window")
    p.add_argument("--dense-max", type=int, default=32768, help="largest N run with dense causal attention (time ~N^2)")
    p.add_argument("--mem-cap-gib", type=float, default=8.0, help="skip points whose analytic peak per rank exceeds this (GiB)")
    p.add_argument("--checkpoint", default=None, help="a Hugging Face Llama directory (default: the demo config, random init)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True, help="recompute each layer in the backward")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per LM-head/loss chunk; 0 = full logits")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--timing-pass", choices=("glibc", "retain", "none"), default="glibc",
                   help="time another pass after the memory pass: 'glibc' under glibc's usual thresholds (what a job "
                        "sees: tensors over 32 MiB mapped and faulted in afresh), 'retain' on a heap that keeps and "
                        "reuses its pages (as a caching allocator would; one more pass first fills it), 'none' times "
                        "the memory pass itself (every allocation of 1 MiB or more mapped afresh: slowest)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one point may take")
    p.add_argument("--out", default="bench_results/scale.json")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def fixed_mmap_threshold(nbytes: int = 1 << 20, trim: int | None = None) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap, returned to the
    system when freed. By default glibc raises that threshold (up to 32 MiB) each time a large
    block is freed, after which tensors of a few MB come from the heap, whose freed pages stay
    resident: the RSS then shows fragmentation, not what the pass holds. ``trim``: also set the
    heap's trim threshold. True where it applied."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
        return ok and (trim is None or bool(libc.mallopt(-1, trim)))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


GLIBC_STEADY = (32 << 20, 64 << 20)
"""glibc's own mmap and trim thresholds once a process has freed large blocks (the most its dynamic
threshold reaches): what a long-running job allocates under, so the timed pass runs under them."""


def retaining_heap() -> bool:
    """Serve every allocation from glibc's heap and never give freed memory back (no mmap, no trim):
    a pass then reuses the pages of the one before instead of mapping and faulting in tensors above
    glibc's 32 MiB mmap ceiling afresh, as a caching allocator would. True where it applied."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def _build(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if cfg["checkpoint"]:
        from ..model.hf import load_pretrained

        return load_pretrained(cfg["checkpoint"])
    from ..model.llama import Llama

    return Llama(ModelConfig(**cfg["model"]))


def _warm_up(model, attend, cfg: dict, layout: str) -> None:
    """One short fwd+bwd first (``WARM_UP`` tokens), so that thread pools, kernels and the process
    group's buffers are in place before the base RSS is read and the clock starts."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    n = min(cfg["tokens"], WARM_UP * world)
    sh = shard_batch(torch.randint(0, model.config.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(1)), layout=layout)
    _pass(model, attend, sh, cfg)
    model.zero_grad(set_to_none=False)


def _point(rank: int, world: int, cfg: dict) -> dict:
    """One fwd+bwd of one N-token sequence on this rank (a fresh process): time, memory, bytes."""
    fixed_mmap_threshold()
    model = _build(cfg)
    n = cfg["tokens"]
    tokens = torch.randint(0, model.config.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(n))
    attn = AttentionConfig(algorithm="tokenring", lambda_mask=cfg["attention"] == "lambda", n_global=cfg["n_global"], n_local=cfg["n_local"])
    attend = make_attend(attn, model.config, train_len=cfg["n_local"])
    sh = shard_batch(tokens, layout=attn.resolved_layout())
    del tokens
    _warm_up(model, attend, cfg, attn.resolved_layout())
    base = _status_kib("VmRSS")
    comm.reset_stats()
    wall, cpu, loss = _pass(model, attend, sh, cfg)
    moved = sum(c.bytes_sent + c.bytes_recv for c in comm.stats().values())
    peak = _status_kib("VmHWM")
    timed = "memory pass"
    if cfg["timing_pass"] != "none":  # the same pass again under the timing pass's allocator
        if cfg["timing_pass"] == "glibc":
            fixed_mmap_threshold(*GLIBC_STEADY)
        else:
            retaining_heap()
            model.zero_grad(set_to_none=False)
            _pass(model, attend, sh, cfg)  # fills the heap with the pass's working set
        model.zero_grad(set_to_none=False)
        wall, cpu, loss2 = _pass(model, attend, sh, cfg)
        if loss2 != loss:
            raise RuntimeError(f"bench scale: the timed pass gave loss {loss2}, the memory pass {loss}")
        timed = f"{cfg['timing_pass']} timing pass"
    return {"rank": rank, "wall_s": wall, "cpu_s": cpu, "sys_s": _PASS_SYS[0], "base_kib": base, "peak_kib": peak, "bytes": moved,
            "loss": loss, "timed": timed}


_PASS_SYS = [0.0]


def _pass(model, attend, sh, cfg: dict) -> tuple[float, float, float]:
    """One fwd+bwd of the shard: (wall s, CPU s, loss)."""
    t0, c0, s0 = time.perf_counter(), time.process_time(), os.times().system
    chunked = cfg["loss_chunk"] > 0
    out = model(sh.input_ids, positions=sh.positions, attend=attend, hidden_only=chunked, checkpoint=cfg["checkpointing"])
    if chunked:
        loss = chunked_sequence_loss(out, model.lm_head.weight, sh.labels, chunk=cfg["loss_chunk"])
    else:
        loss = sequence_loss(out, sh.labels)
    del out
    loss.backward()
    _PASS_SYS[0] = os.times().system - s0  # kernel time (page faults): part of the CPU time
    return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())


def _row(attention: str, world: int, n: int, ranks: list[dict], formula: int) -> dict:
    act = max(r["peak_kib"] - r["base_kib"] for r in ranks) * 1024
    return {
        "attention": attention, "world": world, "tokens": n,
        "wall_s": max(r["wall_s"] for r in ranks),
        "cpu_s": max(r["cpu_s"] for r in ranks),
        "sys_s": max(r["sys_s"] for r in ranks),
        "us_per_token": max(r["wall_s"] for r in ranks) / n * 1e6,
        "cpu_us_per_token": max(r["cpu_s"] for r in ranks) / n * 1e6,
        "peak_gib_per_rank": max(r["peak_kib"] for r in ranks) / 2**20,
        "act_gib_per_rank": act / GIB,
        "formula_gib_per_rank": formula / GIB,
        "act_over_formula": act / formula,
        "mb_moved_per_rank": max(r["bytes"] for r in ranks) / 1e6,
        "loss": ranks[0]["loss"],
        "ranks": ranks,
    }


def _plan(args: argparse.Namespace, mc: ModelConfig) -> tuple[list[tuple[str, int, int, int]], list[str]]:
    """(attention, W, N, analytic bytes per rank) of every point to run, and why others are skipped."""
    todo, skipped = [], []
    for att in args.attention:
        for w in args.worlds:
            for n in args.tokens:
                formula = activation_bytes_per_token(mc, checkpointing=args.checkpointing, loss_chunk=args.loss_chunk,
                                                     tokens_per_rank=n // w, dense=att == "dense") * (n // w)
                why = None
                if n % (2 * w):
                    why = f"N={n} is not a multiple of 2W={2 * w}"
                elif att == "dense" and n > args.dense_max:
                    why = f"N={n} > --dense-max {args.dense_max}"
                elif formula / GIB > args.mem_cap_gib:
                    why = f"analytic {formula / GIB:.2f} GiB per rank > --mem-cap-gib {args.mem_cap_gib}"
                (skipped.append(f"skip {att} W={w} N={n}: {why}") if why else todo.append((att, w, n, formula)))
    return todo, skipped


def _flatness(rows: list[dict]) -> dict:
    """Per (attention, W): time per token at the largest N over the smallest, and the N ratio."""
    checks = {}
    for att in ATTENTIONS:
        for w in sorted({r["world"] for r in rows}):
            sel = sorted((r for r in rows if r["attention"] == att and r["world"] == w), key=lambda r: r["tokens"])
            if len(sel) >= 2:
                checks[f"{att}_W{w}_time_per_token_ratio"] = round(sel[-1]["us_per_token"] / sel[0]["us_per_token"], 3)
                checks[f"{att}_W{w}_cpu_time_per_token_ratio"] = round(sel[-1]["cpu_us_per_token"] / sel[0]["cpu_us_per_token"], 3)
                checks[f"{att}_W{w}_tokens_ratio"] = sel[-1]["tokens"] / sel[0]["tokens"]
    return checks


def _print_table(rows: list[dict]) -> None:
    print(f"{'attention':>9} {'W':>2} {'tokens':>8} {'time s':>8} {'cpu s':>8} {'us/tok':>7} {'cpu us/tok':>10} {'of it sys':>9} {'peak GiB/rank':>13} {'act GiB':>8} "
          f"{'formula':>8} {'act/f':>6} {'MB moved/rank':>13} {'loss':>8}")
    for r in rows:
        print(f"{r['attention']:>9} {r['world']:>2} {r['tokens']:>8} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['us_per_token']:>7.1f} "
              f"{r['cpu_us_per_token']:>10.1f} {r['sys_s'] / max(r['cpu_s'], 1e-9):>9.2f} "
              f"{r['peak_gib_per_rank']:>13.3f} {r['act_gib_per_rank']:>8.3f} {r['formula_gib_per_rank']:>8.3f} "
              f"{r['act_over_formula']:>6.2f} {r['mb_moved_per_rank']:>13.2f} {r['loss']:>8.4f}")


def _plot(path: str, rows: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from pathlib import Path

    from ..run.rundir import atomic_save_figure

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for att, w in sorted({(r["attention"], r["world"]) for r in rows}):
        sel = sorted((r for r in rows if r["attention"] == att and r["world"] == w), key=lambda r: r["tokens"])
        xs = [r["tokens"] for r in sel]
        line = a1.plot(xs, [r["cpu_us_per_token"] for r in sel], marker="o", label=f"{att} W={w} CPU")[0]
        a1.plot(xs, [r["us_per_token"] for r in sel], linestyle=":", color=line.get_color(), label=f"{att} W={w} wall")
        line = a2.plot(xs, [r["act_gib_per_rank"] for r in sel], marker="o", label=f"{att} W={w} measured (peak - base)")[0]
        a2.plot(xs, [r["formula_gib_per_rank"] for r in sel], linestyle="--", color=line.get_color(), label=f"{att} W={w} formula")
    for ax, yl in ((a1, "µs per token, fwd+bwd (CPU: busiest rank)"), (a2, "activation GiB per rank")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ringrt bench scale: one sequence's fwd+bwd of the demo model")
    png = atomic_save_figure(fig, Path(path).with_suffix(".png"), bbox_inches="tight")
    plt.close(fig)
    return png


def main(args: argparse.Namespace) -> int:
    if args.checkpoint:
        from ..model.hf import load_pretrained

        mc = load_pretrained(args.checkpoint).config
    else:
        mc = demo_model_config()
    todo, skipped = _plan(args, mc)
    for line in skipped:
        print(line)
    cfg = {k: v for k, v in vars(args).items() if k not in ("tokens", "worlds", "attention", "out")}
    cfg["model"] = {f: getattr(mc, f) for f in ModelConfig.__slots__}
    rows = []
    t0 = time.time()
    for att, w, n, formula in todo:
        ranks = run_local(_point, w, {**cfg, "attention": att, "tokens": n}, timeout=args.timeout, threads=args.threads)
        rows.append(_row(att, w, n, ranks, formula))
        print(f"  done {att} W={w} N={n}: {rows[-1]['wall_s']:.2f} s, peak {rows[-1]['peak_gib_per_rank']:.3f} GiB/rank", flush=True)
    print(f"demo model fwd+bwd of one sequence: checkpointing={args.checkpointing} loss_chunk={args.loss_chunk} "
          f"Λ n_global={args.n_global} n_local={args.n_local}; dense = causal TokenRing; {args.threads} thread(s)/rank, {os.cpu_count()} cores")
    print("peak = VmHWM of the rank; act = peak - RSS after building the model; formula = analytic activation bytes (ringrt.model.memory)")
    _print_table(rows)
    checks = _flatness(rows)
    print("time: wall clock of the slowest rank; cpu: CPU time of the busiest rank (robust to a shared machine); "
          + {"glibc": "timed: a second pass under glibc's usual allocator thresholds",
             "retain": "timed: a pass on a heap that keeps and reuses its pages (after one that fills it)",
             "none": "timed: the memory pass (every allocation of 1 MiB or more mapped afresh: slower than a job)"}[args.timing_pass])
    print("checks (time per token, largest N over smallest; flat = 1):")
    for k, val in checks.items():
        print(f"  {k} = {val}")
    meta = {**cfg, "tokens": args.tokens, "worlds": args.worlds, "attention": args.attention, "torch": torch.__version__,
            "cpus": os.cpu_count(), "wall_s": round(time.time() - t0, 1), "skipped": skipped}
    write_json(args.out, {"benchmark": "scale", "config": meta, "rows": rows, "checks": checks})
    png = _plot(args.out, rows) if rows else None
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
