"""``ringrt eval``: perplexity at several multiples of the training length, with plain causal
attention ("vanilla") and with the LM-Infinite Λ-mask ("lambda"), and passkey retrieval by length
and depth. Prints a line per (attention, length) as it is scored, then the tables; writes
``results.json`` and PNG plots (rank 0).

Every sequence is sharded over all ranks (one sequence-parallel group): vanilla with the
configured ring algorithm (zigzag), lambda over contiguous shards. The model runs on
:func:`ringrt.distributed.device.job_device` (or stays where a given model is); scores add up there and are
read back once per table cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import time

import torch
import torch.distributed as dist

from ..distributed import device as devices
from ..data.batching import eval_sequences
from ..data.tokenizer import check_tokenizer, load_tokenizer
from ..model.hf import load_pretrained
from ..model.parallel import group_sum, make_attend, sequence_loss, shard_batch
from ..run.rundir import atomic_save_figure, atomic_write_json, resolve_checkpoint
from .config import EvalJobConfig
from .flags import add_dataclass_arguments, build
from .passkey import passkey_example
from .stream_eval import check_stream_settings, run_stream, stream_table
from .train import autocast_for

MODES = ("vanilla", "lambda")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _attend(cfg: EvalJobConfig, model, mode: str, train_len: int):
    attn = dataclasses.replace(cfg.attention, lambda_mask=(mode == "lambda"), layout=None if mode == "lambda" else cfg.attention.layout)
    return make_attend(attn, model.config, train_len=train_len, group=None), attn.resolved_layout()


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, attend, layout: str) -> float:
    """exp(mean next-token NLL) over every token of ``seqs`` (N, L + 1), each sharded over all ranks
    and moved to the model's device."""
    device = devices.module_device(model)
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for seq in seqs:
        sh = shard_batch(seq[None], layout=layout, device=device)
        logits = model(sh.input_ids, positions=sh.positions, attend=attend)  # (1, L_local, V)
        n = seq.numel() - 1
        nll += sequence_loss(logits, sh.labels).double() * n
        count += n
    return math.exp(nll.item() / count)


@torch.no_grad()
def passkey_accuracy(model, tok, length: int, depth: float, trials: int, attend, layout: str, seed: int) -> float:
    """Fraction of ``trials`` prompts whose key the model reproduces exactly (greedy)."""
    rng = random.Random(f"{seed}-{length}-{depth}")
    device = devices.module_device(model)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(trials):
        ids, n_ans = passkey_example(tok, length, depth, rng)
        labels = torch.full_like(ids, -100)
        labels[-n_ans:] = ids[-n_ans:]
        sh = shard_batch(ids[None], layout=layout, device=device)
        lab = shard_batch(labels[None], layout=layout, device=device).labels
        logits = model(sh.input_ids, positions=sh.positions, attend=attend)
        scored = lab != -100
        wrong = ((logits.argmax(-1) != lab) & scored).sum().to(torch.float64)
        hits += group_sum(wrong) == 0
    return hits.item() / trials


def _table(title: str, rows: list[str], cols: list[str], cell) -> str:
    w = max(10, *(len(c) + 2 for c in cols))
    lines = [title, f"{'':>10}" + "".join(f"{c:>{w}}" for c in cols)]
    for r in rows:
        lines.append(f"{r:>10}" + "".join(f"{cell(r, c):>{w}}" for c in cols))
    return "\n".join(lines)


def _plot(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, row in results["perplexity"].items():
        xs = sorted(int(L) for L in row)
        ax.plot(xs, [row[str(L)] for L in xs], marker="o", label="Λ-mask" if mode == "lambda" else "vanilla")
    ax.axvline(results["train_len"], color="grey", linestyle="--", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers, not 1.8x10^1
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    xs_all = sorted({int(L) for row in results["perplexity"].values() for L in row})
    ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity beyond the training length")
    ax.legend()
    fig.tight_layout()
    written.append(atomic_save_figure(fig, os.path.join(out_dir, "perplexity.png")))
    if results.get("passkey"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, row in results["passkey"].items():
            xs = sorted(int(L) for L in row)
            ax.plot(xs, [sum(row[str(L)].values()) / len(row[str(L)]) for L in xs], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("passkey accuracy (mean over depths)")
        ax.legend()
        fig.tight_layout()
        written.append(atomic_save_figure(fig, os.path.join(out_dir, "passkey.png")))
    plt.close("all")
    return written


def _check_modes(e) -> None:
    bad = [m for m in e.modes if m not in MODES]
    if bad or not e.modes:
        raise ValueError(f"eval.modes={e.modes} must be a non-empty list of {', '.join(MODES)}")
    if any(m < 1 for m in e.multiples + e.passkey_multiples):
        raise ValueError(f"eval.multiples={e.multiples} / eval.passkey_multiples={e.passkey_multiples} must be positive integers")


def _check_lengths(e, train_len: int, world: int) -> None:
    """Every evaluated length must split over the ranks in both layouts (zigzag needs 2 x world chunks)."""
    for m in e.multiples + e.passkey_multiples:
        if (m * train_len) % (2 * world):
            raise ValueError(f"eval length {m * train_len} (= {m} x train_len {train_len}) is not a multiple of "
                             f"{2 * world} (2 x world size), which the zigzag layout needs")


def _perplexity_row(cfg: EvalJobConfig, model, tok, attend, layout: str, *, mode: str, train_len: int, autocast, say) -> dict:
    """{str(length): perplexity} for every ``eval.multiples`` length, one progress line each."""
    e, row = cfg.eval, {}
    for m in e.multiples:
        L, t0 = m * train_len, time.perf_counter()
        seqs = eval_sequences(cfg.data, tok, L, max(1, e.tokens // L))
        with autocast():
            ppl = perplexity(model, seqs, attend, layout)
        row[str(L)] = ppl
        say(f"eval: {mode:>7} at {L:>6} tokens: perplexity {ppl:.3f} ({len(seqs)} sequence{'s' if len(seqs) > 1 else ''}, "
            f"{time.perf_counter() - t0:.1f} s)")
    return row


def _passkey_row(cfg: EvalJobConfig, model, tok, attend, layout: str, *, mode: str, train_len: int, autocast, say) -> dict:
    """{str(length): {str(depth): accuracy}} for every ``eval.passkey_multiples`` length, one progress line each."""
    e, row = cfg.eval, {}
    for m in e.passkey_multiples:
        L, t0 = m * train_len, time.perf_counter()
        with autocast():
            by_depth = {str(d): passkey_accuracy(model, tok, L, d, e.passkey_trials, attend, layout, e.seed)
                        for d in e.passkey_depths}
        row[str(L)] = by_depth
        say(f"eval: {mode:>7} at {L:>6} tokens: passkey accuracy {sum(by_depth.values()) / len(by_depth):.2f} "
            f"({len(by_depth)} depths x {e.passkey_trials} trials, {time.perf_counter() - t0:.1f} s)")
    return row


def _tables(results: dict, e, train_len: int) -> str:
    """The perplexity table, then one passkey table per attention mode (when passkey ran)."""
    lengths = [str(m * train_len) for m in e.multiples]
    text = _table(f"perplexity (trained at {train_len} tokens; rows: attention, columns: context length)",
                  e.modes, lengths, lambda r, c: f"{results['perplexity'][r][c]:.3f}")
    if results["passkey"]:
        for mode in e.modes:
            pk = results["passkey"][mode]
            text += "\n\n" + _table(f"passkey accuracy, {mode} (rows: depth, columns: context length)",
                                    [str(d) for d in e.passkey_depths], list(pk), lambda r, c, pk=pk: f"{pk[c][r]:.2f}")
    return text


def _write_results(results: dict, out_dir: str, print_fn) -> None:
    """Rank 0: ``results.json`` and the plots in ``out_dir``, then the tables on the console."""
    os.makedirs(out_dir, exist_ok=True)
    results["plots"] = _plot(results, out_dir)
    atomic_write_json(os.path.join(out_dir, "results.json"), results, sort_keys=False)
    print_fn(results["table"])
    print_fn(f"wrote {os.path.join(out_dir, 'results.json')} and {', '.join(results['plots'])}")


def run_eval(cfg: EvalJobConfig, model=None, print_fn=print) -> dict:
    """Evaluate; returns the results dict (also written to ``<out_dir>/results.json`` by rank 0).

    ``model``: evaluate this model where it is; default: the checkpoint's, on :func:`ringrt.distributed.device.job_device`.
    """
    if cfg.compression.enabled:
        from ..compression.eval import run_compression_eval

        return run_compression_eval(cfg, print_fn)
    e = cfg.eval
    _check_modes(e)
    hf_dir, extra = resolve_checkpoint(e.checkpoint)
    train_len = e.train_len or extra.get("train_len") or cfg.data.seq_len
    tok = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer is not None else extra.get("tokenizer"))
    if model is None:
        model = load_pretrained(hf_dir).to(devices.job_device())
    model.eval()
    check_tokenizer(tok, model.config)
    world = _world()
    _check_lengths(e, train_len, world)
    check_stream_settings(e, train_len, world)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    say = print_fn if rank0 else (lambda *a, **k: None)
    results: dict = {"train_len": train_len, "world": world, "checkpoint": hf_dir, "perplexity": {}, "passkey": {}}
    autocast = autocast_for(e.precision, devices.module_device(model))
    say(f"eval: {hf_dir} (trained at {train_len} tokens) on {world} rank{'s' if world > 1 else ''}: "
        f"{'/'.join(e.modes)} at {', '.join(str(m * train_len) for m in e.multiples)} tokens, "
        f"{e.tokens} tokens per length")
    for mode in e.modes:
        attend, layout = _attend(cfg, model, mode, train_len)
        scoring = dict(mode=mode, train_len=train_len, autocast=autocast, say=say)
        results["perplexity"][mode] = _perplexity_row(cfg, model, tok, attend, layout, **scoring)
        if e.passkey_multiples:
            results["passkey"][mode] = _passkey_row(cfg, model, tok, attend, layout, **scoring)
    if e.stream_multiples:
        results["stream"] = run_stream(cfg, model, tok, train_len=train_len, autocast=autocast, say=say)
    results["table"] = _tables(results, e, train_len)
    if e.stream_multiples:
        results["table"] += "\n\n" + stream_table(results["stream"])
    if rank0:
        _write_results(results, e.out_dir, print_fn)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(p, EvalJobConfig)


def main(args: argparse.Namespace) -> int:
    from ..distributed.launcher import init_distributed

    from .interrupt import stops_cleanly

    cfg = build(EvalJobConfig, args)
    with stops_cleanly("evaluation"):
        init_distributed()
        run_eval(cfg)
    return 0
