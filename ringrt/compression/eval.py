"""``ringrt eval --compression.enabled true``: perplexity of the last chunk of long documents.

Each validation document has ``compression.doc_len`` tokens; its last ``raw_len`` tokens are scored
(the first of them predicted from the context alone). Rows of the table:

* ``none``: the raw tail alone, no context (the floor the compressed context must improve on);
* ``truncate``: plain attention over the last ``window`` tokens only (the LLM's own window);
* ``lambda``: the whole document with the LM-Infinite Λ-mask (n_local = window, n_global =
  ``attention.n_global``), contiguous shards;
* ``k=2 ..``: Extensible Tokenization, [compressed context; raw tail] — the compressed context
  truncated to its most recent ``window - raw_len + 1`` embeddings, so the LLM never reads more than
  its window — zigzag shards through ``attention.algorithm``;
* ``auto``: the smallest k of ``compression.ks`` whose whole compressed context fits.

Everything runs sequence-parallel over all ranks (the embedder on chunk-aligned shards), on
:func:`ringrt.distributed.device.job_device`: each document moves there once; each row is read back once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
import torch.distributed as dist

from ..distributed import device as devices
from ..data.batching import eval_sequences
from ..data.tokenizer import check_tokenizer, load_tokenizer
from ..distributed.groups import base_group
from ..ops.layout import num_chunks, pad_to_multiple, positions as layout_positions, shard_of
from ..model.hf import load_pretrained
from ..model.parallel import make_attend, sequence_loss
from ..run.rundir import atomic_save_figure, atomic_write_json, resolve_checkpoint
from .embedder import load_embedder
from .packing import freeze
from .parallel import compressed_logits
from .select import choose_k


def _sharded_loss(llm, tokens: torch.Tensor, labels: torch.Tensor, attend, layout: str) -> torch.Tensor:
    """Mean NLL (0-dim, on the tokens' device) of ``labels`` (B, S) (-100 = not scored) given
    ``tokens`` (B, S), sharded in ``layout``."""
    _, rank, world = base_group(None)
    n = num_chunks(layout, world)
    tokens, labels = pad_to_multiple(tokens, n), pad_to_multiple(labels, n, value=-100)
    ids, lab = shard_of(tokens, layout, rank, world), shard_of(labels, layout, rank, world)
    pos = layout_positions(layout, rank, world, ids.shape[1]).to(ids.device)
    logits = llm(ids, positions=pos, attend=attend)
    return sequence_loss(logits, lab)


def _compressed_loss(llm, emb, doc: torch.Tensor, *, raw_len: int, chunk_len: int, k: int, keep: int | None,
                     algorithm: str) -> torch.Tensor:
    context, raw = doc[:, :-raw_len], doc[:, -raw_len:]
    logits, pos, M = compressed_logits(llm, emb, context, raw[:, :-1], chunk_len=chunk_len, k=k, keep=keep, algorithm=algorithm)
    labels = torch.full((doc.shape[0], M + raw_len - 1), -100, dtype=torch.int64, device=doc.device)
    labels[:, M - 1 :] = raw  # row M-1 (last compressed) predicts raw[0]; raw row t predicts raw[t+1]
    _, rank, world = base_group(None)
    if world > 1:
        labels = shard_of(pad_to_multiple(labels, num_chunks("zigzag", world), value=-100), "zigzag", rank, world)
    return sequence_loss(logits, labels)


def _mean_perplexity(docs: torch.Tensor, loss_of) -> float:
    """exp(mean over ``docs`` (n_docs, doc_len) of ``loss_of(doc[None])``); the row's one host read."""
    total = torch.zeros((), dtype=torch.float64, device=docs.device)
    for d in docs:
        total += loss_of(d[None]).double()
    return math.exp(total.item() / len(docs))


def _scored_tail(d: torch.Tensor, start: int, raw_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of ``d`` (1, doc_len) from token ``start`` on, scoring only the last ``raw_len`` tokens."""
    inp, lab = d[:, start:-1], d[:, start + 1 :].clone()
    lab[:, : lab.shape[1] - raw_len] = -100
    return inp, lab


def _check_lengths(c, raw_len: int, window: int) -> None:
    if not 2 <= raw_len <= window:
        raise ValueError(f"compression.raw_len={raw_len} must be in [2, window={window}]")
    if c.doc_len <= window:
        raise ValueError(f"compression.doc_len={c.doc_len} must exceed the window {window} (otherwise nothing needs compressing)")


def _baseline_rows(cfg, llm, docs: torch.Tensor, *, raw_len: int, window: int) -> dict[str, float]:
    """The rows without the embedder that ``compression.baselines`` asks for: none, truncate, lambda."""
    c, R = cfg.compression, raw_len
    truncate_attend = make_attend(dataclasses.replace(cfg.attention, lambda_mask=False, layout="zigzag"), llm.config, train_len=window)
    lambda_cfg = dataclasses.replace(cfg.attention, lambda_mask=True, layout="contiguous", n_local=window, limit_distance=window)
    lambda_attend = make_attend(lambda_cfg, llm.config, train_len=window)
    rows: dict[str, float] = {}
    if "none" in c.baselines:
        rows["none"] = _mean_perplexity(
            docs, lambda d: _sharded_loss(llm, *_scored_tail(d, c.doc_len - R - 1, R), truncate_attend, "zigzag"))
    if "truncate" in c.baselines:
        rows["truncate"] = _mean_perplexity(
            docs, lambda d: _sharded_loss(llm, *_scored_tail(d, c.doc_len - window - 1, R), truncate_attend, "zigzag"))
    if "lambda" in c.baselines:
        rows["lambda"] = _mean_perplexity(docs, lambda d: _sharded_loss(llm, *_scored_tail(d, 0, R), lambda_attend, "contiguous"))
    return rows


def _compressed_rows(cfg, llm, emb, docs: torch.Tensor, *, raw_len: int, window: int, chunk_len: int) -> dict[str, float]:
    """One row per factor k: the context compressed k-fold and cut to the window, then the raw tail."""
    keep = window - (raw_len - 1)
    return {f"k={k}": _mean_perplexity(docs, functools.partial(_compressed_loss, llm, emb, raw_len=raw_len, chunk_len=chunk_len,
                                                                k=k, keep=keep, algorithm=cfg.attention.algorithm))
            for k in cfg.compression.factors()}


def _summary(rows: dict[str, float], results: dict) -> str:
    R, auto = results["raw_len"], results["auto_k"]
    return (f"perplexity of the last {R} tokens of {results['documents']} documents of {results['doc_len']} tokens "
            f"(LLM window {results['window']})\n"
            + "\n".join(f"{name:>10} {ppl:10.3f}" for name, ppl in rows.items())
            + (f"\n  smallest k whose whole context fits the window: {auto}" if auto else "\n  no k in ks fits the whole context"))


@torch.no_grad()
def run_compression_eval(cfg, print_fn=print) -> dict:
    """Perplexity table (see the module doc); returns it and writes ``results.json`` + ``compression.png``."""
    c, e = cfg.compression, cfg.eval
    c.validate()
    if not c.embedder:
        raise ValueError("compression.embedder=None: valid: the directory written by ringrt train --compression.enabled true "
                         "(<train.out_dir>/embedder)")
    hf_dir, extra = resolve_checkpoint(e.checkpoint)
    window = c.window or e.train_len or extra.get("train_len") or cfg.data.seq_len
    R = c.resolved_raw_len()
    _check_lengths(c, R, window)
    tok = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer is not None else extra.get("tokenizer"))
    llm = freeze(load_pretrained(hf_dir)).to(devices.job_device()).eval()
    check_tokenizer(tok, llm.config)
    emb, meta = load_embedder(c.embedder, llm)
    emb.eval()
    chunk_len = meta.get("chunk_len", c.chunk_len)
    device = devices.module_device(llm)
    docs = eval_sequences(cfg.data, tok, c.doc_len - 1, max(1, e.tokens // c.doc_len)).to(device)  # (n_docs, doc_len)
    rows = _baseline_rows(cfg, llm, docs, raw_len=R, window=window)
    rows.update(_compressed_rows(cfg, llm, emb, docs, raw_len=R, window=window, chunk_len=chunk_len))
    try:
        auto = choose_k(c.doc_len - R, R - 1, window=window, chunk_len=chunk_len, ks=c.factors())
    except ValueError:
        auto = None
    results = {"doc_len": c.doc_len, "raw_len": R, "window": window, "chunk_len": chunk_len, "auto_k": auto,
               "documents": len(docs), "perplexity": rows, "checkpoint": hf_dir, "embedder": c.embedder}
    results["table"] = _summary(rows, results)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(e.out_dir, exist_ok=True)
        results["plots"] = [atomic_save_figure(_bar(rows, results), os.path.join(e.out_dir, "compression.png"))]
        atomic_write_json(os.path.join(e.out_dir, "results.json"), results, sort_keys=False)
        print_fn(results["table"])
    return results


def _bar(rows: dict[str, float], results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(list(rows), list(rows.values()), color=["grey" if not n.startswith("k=") else "tab:blue" for n in rows])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)  # the differences are small: the labels carry them
    ax.set_ylim(0, max(rows.values()) * 1.15)  # bars start at 0, so their heights compare honestly
    ax.set_ylabel("perplexity of the last chunk\n(lower is better)")
    ax.set_title(f"{results['doc_len']}-token documents, window {results['window']}")
    fig.tight_layout()
    return fig
