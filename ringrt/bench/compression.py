"""``ringrt bench compression``: Extensible Tokenization on the demo's small model.

1. The frozen LLM: ``--llm`` (default the ``ringrt demo`` run, outputs/demo/train); trained here
   with the demo's settings first when it is missing.
2. The embedder trains for ``--minutes`` (two-stream, packed, k sampled from {2,4,8,16,32}) on
   ``--world`` local ranks (data-parallel).
3. Perplexity of the last chunk of ``--doc-len``-token validation documents: truncation to the
   window, the Λ-mask, Extensible Tokenization at each k (sequence-parallel over the ranks).
4. Attention time and K/V memory of the frozen LLM at a fixed context vs k (one process, the
   model's own head shapes, the CPU flash kernel ringrt's rings use, GQA without replicating K/V; k = 1 is the uncompressed context), each
   length timed in turn in every round so load changes hit all alike; speed-up = median ratio.

Writes ``compression.json``, ``compression.png`` (perplexity) and ``compression_attention.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .report import maybe_plot, write_json


def _train_llm(rank, world, out_dir, steps):
    from ..jobs.config import DemoConfig, TrainJobConfig
    from ..jobs.train import run_train

    d = DemoConfig()
    d.train.out_dir, d.train.steps, d.train.progress = out_dir, steps, False
    return run_train(TrainJobConfig(model=d.model, attention=d.attention, data=d.data, train=d.train))["hf_dir"]


def _train_embedder(rank, world, cfg):
    from ..jobs.train import run_train

    return {k: v for k, v in run_train(cfg).items() if k != "losses"}


def _evaluate(rank, world, cfg):
    from ..jobs.eval import run_eval

    return run_eval(cfg, print_fn=lambda s: None)


def attention_rows(*, n_heads: int, n_kv_heads: int, head_dim: int, context: int, raw: int, ks: list[int], rounds: int) -> list[dict]:
    """Causal attention fwd time and K/V bytes per layer for [ceil(context / k) + raw] tokens, k in ks."""
    lengths = {k: -(-context // k) + raw for k in ks}
    data = {k: (torch.randn(1, n_heads, S, head_dim), torch.randn(1, n_kv_heads, S, head_dim), torch.randn(1, n_kv_heads, S, head_dim))
            for k, S in lengths.items()}
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for k in ks:
            q, kk, v = data[k]
            t0 = time.perf_counter()
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kk, v, 0.0, True)
            times[k].append(time.perf_counter() - t0)
    base = ks[0]
    rows = []
    for k in ks:
        ratio = statistics.median(a / b for a, b in zip(times[base][1:], times[k][1:], strict=True))
        rows.append({"k": k, "tokens": lengths[k], "attention_ms": 1e3 * statistics.median(times[k][1:]),
                     "speedup": ratio, "target_k2_over_2": k * k / 2,
                     "kv_bytes_per_layer": 2 * lengths[k] * n_kv_heads * head_dim * 4})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", default="outputs/demo/train", help="frozen LLM: HF dir or training out_dir (default %(default)s)")
    p.add_argument("--llm-steps", type=int, default=300, help="demo training steps when --llm is missing (default %(default)s)")
    p.add_argument("--out-dir", default="bench_results", help="(default %(default)s)")
    p.add_argument("--world", type=int, default=2, help="local CPU ranks (default %(default)s)")
    p.add_argument("--minutes", type=float, default=4.0, help="embedder training wall time (default %(default)s)")
    p.add_argument("--steps", type=int, default=2000, help="embedder schedule length in steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="embedder peak learning rate (default %(default)s)")
    p.add_argument("--chunk-len", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--doc-len", type=int, default=2048, help="tokens per evaluation document (default %(default)s)")
    p.add_argument("--docs", type=int, default=8, help="evaluation documents (default %(default)s)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16], help="factors evaluated (default %(default)s)")
    p.add_argument("--context", type=int, default=8192, help="fixed context for the attention timing (default %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    from ..compression.config import CompressionConfig
    from ..data.config import DataConfig
    from ..jobs.config import EvalConfig, EvalJobConfig, TrainConfig, TrainJobConfig
    from ..run.rundir import resolve_checkpoint
    from ..model.hf import read_config
    from ..distributed.spawn import run_local

    out = Path(args.out_dir)
    llm = args.llm
    if not (Path(llm) / "config.json").is_file() and not (Path(llm) / "hf" / "config.json").is_file():
        print(f"no LLM at {llm}: training the demo model there ({args.llm_steps} steps)", flush=True)
        run_local(_train_llm, args.world, llm, args.llm_steps, timeout=7200.0)
    hf_dir, extra = resolve_checkpoint(llm)
    window = int(extra.get("train_len", 256))
    run_dir = out / "compression_run"
    comp = CompressionConfig(enabled=True, chunk_len=args.chunk_len, train_chunks=8, train_minutes=args.minutes)
    train = TrainConfig(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=20, log_every=25,
                        out_dir=str(run_dir), init_from=hf_dir, progress=False)
    t0 = time.perf_counter()
    tr = run_local(_train_embedder, args.world, TrainJobConfig(data=DataConfig(seq_len=window, batch_size=4), train=train,
                                                               compression=comp), timeout=7200.0)[0]
    print(f"embedder: {tr['step']} steps in {tr['seconds']:.0f} s, final two-stream loss {tr['loss']:.3f}", flush=True)
    ev_comp = CompressionConfig(enabled=True, chunk_len=args.chunk_len, ks=args.ks, doc_len=args.doc_len,
                                embedder=tr["embedder_dir"])
    ev = EvalConfig(checkpoint=hf_dir, tokens=args.docs * args.doc_len, out_dir=str(out))
    res = run_local(_evaluate, args.world, EvalJobConfig(eval=ev, compression=ev_comp), timeout=7200.0)[0]
    print(res["table"], flush=True)
    mc = read_config(hf_dir)
    torch.set_num_threads(1)
    rows = attention_rows(n_heads=mc.n_heads, n_kv_heads=mc.kv_heads, head_dim=mc.head_size, context=args.context,
                          raw=args.chunk_len, ks=[1, *args.ks], rounds=args.rounds)
    print(f"\nattention of the frozen LLM over a {args.context}-token context + {args.chunk_len} raw tokens "
          f"(causal, fwd, per layer, 1 thread)")
    print(f"{'k':>4} {'tokens':>8} {'ms':>10} {'speed-up':>10} {'k²/2':>8} {'K/V bytes':>12}")
    for r in rows:
        print(f"{r['k']:>4} {r['tokens']:>8} {r['attention_ms']:>10.2f} {r['speedup']:>10.1f} {r['target_k2_over_2']:>8.1f} "
              f"{r['kv_bytes_per_layer']:>12}")
    result = {"llm": hf_dir, "window": window, "embedder_train": tr, "perplexity": res["perplexity"], "eval": {
        k: res[k] for k in ("doc_len", "raw_len", "documents", "auto_k")}, "attention": rows,
        "minutes": (time.perf_counter() - t0) / 60}
    path = out / "compression.json"
    write_json(path, result)
    png = maybe_plot(out / "compression_attention.json", rows, x="k", ys=["speedup", "target_k2_over_2"], group=None,
                     title=f"attention speed-up vs k ({args.context}-token context)", ylabel="speed-up t(k=1) / t(k) (higher is better)")
    print(f"wrote {path}, {out / 'compression.png'}" + (f", {png}" if png else ""))
    return 0
