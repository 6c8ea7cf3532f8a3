"""``ringrt bench decode``: decode tokens/s of the demo model with the Λ-mask cache vs a full KV cache.

LM-Infinite reports 2.72x faster decoding than a full cache at 32K context. For each context length
L this builds a cache as if an L-token prompt had been prefilled, then times N greedy decode steps of
the whole model (embedding, every layer, lm_head, argmax), one process:

* full: :class:`ringrt.model.kvcache.FullKVCache`: every past token's K/V, preallocated buffers,
  one grouped-query matmul for the scores, a softmax, one matmul with V (as fast as sdpa on CPU, a
  bit faster at 32K with one thread); the cost grows with L;
* lambda: :class:`ringrt.model.kvcache.LambdaPrefillCache` (what ``ringrt generate`` uses with the
  Λ-mask), one :class:`ringrt.LambdaKVCache` per layer: n_global + n_local kept tokens, whatever L;
* sharded (``--with-sharded``): :class:`ringrt.model.kvcache.ShardedKVCache` on one rank, the
  non-Λ cache of ``ringrt generate``; it concatenates its K/V every step (a copy of the past).

The prompt is not run: the caches are filled directly with random K/V of the right size (every
layer: L rows for the full caches; the first n_global and last n_local rows for the Λ cache, loaded
as ``LambdaPrefillCache`` loads them after a prefill). Decode cost does not depend on the values.
Points are timed in rounds, full and Λ interleaved at each L; the median and the fastest round are
reported (on a shared machine the fastest is the least disturbed); besides wall time each point
records CPU time (``time.process_time``), which other jobs on the machine do not inflate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ..jobs.config import DemoConfig
from ..lm_infinite import LambdaMask
from ..model.config import ModelConfig
from ..model.hf import read_config
from ..model.kvcache import FullKVCache, LambdaPrefillCache, ShardedKVCache
from ..model.llama import Llama
from .report import maybe_plot, write_json

KINDS = ("full", "lambda", "sharded")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072],
                   help="context lengths L (tokens already in the cache)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per point (N)")
    p.add_argument("--warmup", type=int, default=4, help="decode steps before timing")
    p.add_argument("--reps", type=int, default=3, help="rounds; the median round is reported")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-global", type=int, default=8, help="LambdaMask.n_global (ringrt's default)")
    p.add_argument("--n-local", type=int, default=None, help="LambdaMask.n_local (default: the model's max_position_embeddings)")
    p.add_argument("--config", default=None, help="Hugging Face model directory whose config.json gives the model (default: the demo's model, as `ringrt demo` trains it)")
    p.add_argument("--checkpoint", default=None, help="load these weights (an hf directory); default random init")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--with-sharded", action="store_true", help="also time ShardedKVCache (torch.cat per step)")
    p.add_argument("--out", default="bench_results/decode.json")


def _model(args: argparse.Namespace) -> Llama:
    if args.checkpoint:
        from ..model.hf import load_pretrained

        return load_pretrained(args.checkpoint)
    cfg: ModelConfig = read_config(args.config) if args.config else DemoConfig().model
    torch.manual_seed(0)
    return Llama(cfg)


def _filled_cache(kind: str, model: Llama, L: int, args: argparse.Namespace, mask: LambdaMask):
    """A cache holding what an L-token prompt leaves (random K/V), ready to decode."""
    c = model.config
    g = torch.Generator().manual_seed(L)
    kv = lambda n: [torch.randn(args.batch, n, c.kv_heads, c.head_size, generator=g) for _ in range(2)]  # noqa: E731
    if kind == "lambda":
        cache = LambdaPrefillCache(n_layers=c.n_layers, prefill_attend=None, mask=mask, rope_theta=c.rope_theta, real_len=L)
        for layer in cache.caches:
            layer.load(*kv(cache.keep.numel()), cache.keep, L)
    elif kind == "full":
        cache = FullKVCache(n_layers=c.n_layers, capacity=L + args.warmup + args.new_tokens)
        for layer in range(c.n_layers):
            cache.load(layer, *kv(L))
    else:
        cache = ShardedKVCache(n_layers=c.n_layers, real_len=L)
        for layer in range(c.n_layers):
            cache.k[layer], cache.v[layer] = kv(L)
    cache.advance()  # prefill done: the next calls decode
    return cache


def _decode(model: Llama, cache, L: int, steps: int, tok: torch.Tensor) -> torch.Tensor:
    """``steps`` greedy decode steps at positions L, L+1, ...; returns the last token (B, 1)."""
    for t in range(steps):
        logits = model(tok, positions=torch.tensor([L + t]), attend=cache)[:, -1]  # (B, V)
        tok = logits.argmax(-1, keepdim=True)
        cache.advance()
    return tok


@torch.inference_mode()
def _time_point(kind: str, model: Llama, L: int, args: argparse.Namespace, mask: LambdaMask) -> tuple[float, float]:
    """(wall s, CPU s) of N decode steps after the warm-up ones."""
    cache = _filled_cache(kind, model, L, args, mask)
    tok = _decode(model, cache, L, args.warmup, torch.zeros(args.batch, 1, dtype=torch.long))
    t0, c0 = time.perf_counter(), time.process_time()
    _decode(model, cache, L + args.warmup, args.new_tokens, tok)
    return time.perf_counter() - t0, time.process_time() - c0


def _row(L: int, times: dict, args: argparse.Namespace, kinds: list[str]) -> dict:
    tokens = args.batch * args.new_tokens
    row: dict = {"context": L}
    for kind in kinds:
        ts = times[kind, L]
        row[f"{kind}_tok_s"] = tokens / statistics.median(t[0] for t in ts)
        row[f"{kind}_cpu_tok_s"] = tokens / statistics.median(t[1] for t in ts)
        row[f"{kind}_best_tok_s"] = tokens / min(t[0] for t in ts)
        row[f"{kind}_wall_s_all"] = [round(t[0], 5) for t in ts]
    row["ratio"] = row["lambda_tok_s"] / row["full_tok_s"]
    row["best_ratio"] = row["lambda_best_tok_s"] / row["full_best_tok_s"]
    row["cpu_ratio"] = row["lambda_cpu_tok_s"] / row["full_cpu_tok_s"]
    return row


def _spread(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows]
    return round(max(vals) / min(vals), 3)


def _checks(rows: list[dict], n_local: int) -> dict:
    """Λ flatness (max/min of its tok/s over the grid, and over the contexts >= n_local, where its
    cache is full: below, it holds fewer keys and is faster) and the ratio at 32K."""
    checks = {f"{k}_max_over_min": _spread(rows, k) for k in ("lambda_tok_s", "lambda_best_tok_s", "lambda_cpu_tok_s")}
    full = [r for r in rows if r["context"] >= n_local]
    if full:
        checks.update({f"{k}_max_over_min_at_L_ge_n_local": _spread(full, k) for k in ("lambda_tok_s", "lambda_cpu_tok_s")})
    at32 = [r for r in rows if r["context"] == 32768]
    if at32:
        checks["ratio_at_32K"] = round(at32[0]["ratio"], 3)
        checks["cpu_ratio_at_32K"] = round(at32[0]["cpu_ratio"], 3)
        checks["best_ratio_at_32K"] = round(at32[0]["best_ratio"], 3)
        checks["ratio_at_32K_ge_2.7"] = at32[0]["ratio"] >= 2.7
    return checks


def _print(rows: list[dict], kinds: list[str], head: str) -> None:
    print(head)
    extra = "".join(f" {k + ' tok/s':>14}" for k in kinds[2:])
    print("tok/s: median round (wall); best: fastest round; cpu ratio: from CPU time (robust to other jobs)")
    print(f"{'context':>8} {'full tok/s':>11} {'Λ tok/s':>9} {'ratio':>6} {'best full':>9} {'best Λ':>8} {'best ratio':>10} "
          f"{'cpu ratio':>9}" + extra)
    for r in rows:
        more = "".join(f" {r[f'{k}_tok_s']:>14.1f}" for k in kinds[2:])
        print(f"{r['context']:>8} {r['full_tok_s']:>11.1f} {r['lambda_tok_s']:>9.1f} {r['ratio']:>6.2f} {r['full_best_tok_s']:>9.1f} "
              f"{r['lambda_best_tok_s']:>8.1f} {r['best_ratio']:>10.2f} {r['cpu_ratio']:>9.2f}" + more)


def main(args: argparse.Namespace) -> int:
    if min(args.contexts) < 1 or args.new_tokens < 1 or args.reps < 1 or args.warmup < 0:
        raise SystemExit(f"--contexts {args.contexts}, --new-tokens {args.new_tokens}, --reps {args.reps} must be >= 1 "
                         f"and --warmup {args.warmup} >= 0")
    torch.set_num_threads(args.threads)
    model = _model(args).eval()
    c = model.config
    mask = LambdaMask(n_global=args.n_global, n_local=args.n_local or c.max_position_embeddings)
    if mask.problem():
        raise SystemExit(mask.problem())
    kinds = list(KINDS if args.with_sharded else KINDS[:2])
    t0 = time.time()
    times: dict[tuple[str, int], list[tuple[float, float]]] = {(k, L): [] for k in kinds for L in args.contexts}
    for _ in range(args.reps):  # rounds: a slow drift of the shared machine hits every point alike
        for L in args.contexts:
            for kind in kinds:
                times[kind, L].append(_time_point(kind, model, L, args, mask))
    rows = [_row(L, times, args, kinds) for L in args.contexts]
    checks = _checks(rows, mask.n_local)
    _print(rows, kinds, f"decode, one process, {args.threads} thread(s), {os.cpu_count()} cores: B={args.batch}, "
                        f"{c.n_layers} layers, dim {c.dim}, H={c.n_heads}/{c.kv_heads}, D={c.head_size}; Λ n_global={mask.n_global} "
                        f"n_local={mask.n_local}; N={args.new_tokens} tokens after {args.warmup} warm-up, median of {args.reps} rounds")
    for k, val in checks.items():
        print(f"  {k} = {val}")
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    meta.update(n_local=mask.n_local, model={"layers": c.n_layers, "dim": c.dim, "heads": c.n_heads, "kv_heads": c.kv_heads,
                                            "head_dim": c.head_size, "vocab": c.vocab_size},
                torch=torch.__version__, cpus=os.cpu_count(), wall_s=round(time.time() - t0, 1),
                prefill="caches filled directly with random K/V (full: L rows per layer; Λ: first n_global + last n_local)")
    write_json(args.out, {"benchmark": "decode", "config": meta, "rows": rows, "checks": checks})
    png = maybe_plot(args.out, rows, x="context", ys=[f"{k}_tok_s" for k in kinds], group=None,
                     title="decode tokens/s: Λ-mask cache vs full KV cache", ylabel="tokens/s")
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
