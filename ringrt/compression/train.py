"""``ringrt train --compression.enabled true``: train the extensible embedder of a frozen LLM.

The LLM (``train.init_from``) is frozen; only the embedder's parameters get gradients. Every
example is ``compression.train_chunks`` chunks of ``compression.chunk_len`` tokens; its factor k is
sampled from ``compression.ks`` (or fixed by ``compression.k``); its loss is the packed two-stream
loss (``packing.py``). The ranks run data-parallel (each packs its own examples; the block mask is
not a ring mask) and all-reduce the embedder's gradients. The embedder is written (rank 0,
atomically) to ``<train.out_dir>/embedder``. LLM, embedder, examples and loss totals live on
:func:`ringrt.distributed.device.job_device`; the host reads the loss once per optimizer step.

Checkpoints and resume work as in the main trainer (``ringrt/jobs/train.py``, ``ringrt/run/checkpoint.py``):
every ``train.ckpt_every`` steps, at ``train.steps`` and when ``compression.train_minutes`` stops the
run, the embedder, its AdamW state, every rank's RNG and the data position go atomically to
``<train.out_dir>/embedder_checkpoints/step_<n>`` (the newest ``train.keep_last`` kept; a directory of
its own, so an LLM's ``checkpoints`` in the same out_dir are never read or pruned). The frozen LLM is
not saved: it is ``train.init_from`` again. With ``train.resume`` (the default) a rerun of the same
command continues from the newest complete checkpoint: the data stream resumes at the next batch and
k is a function of (seed, step, rank), so the loss curve after a ``kill -9`` and a rerun is bit-identical
to an uninterrupted run's (``tests/test_compression_resume.py``); ``resumed_from`` is logged. A
checkpoint written with other ``compression.chunk_len``/``train_chunks``/``ks``/``k``/``embedder_layers``
is refused (ValueError naming the setting), since it would continue a different data stream or model.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist

from ..run import checkpoint
from ..distributed import device as devices
from ..data.batching import train_batches
from ..data.tokenizer import check_tokenizer, load_tokenizer
from ..run.lr_schedule import lr_at
from ..run.metrics import ConsoleSink, JsonlSink, MetricsLogger
from ..run.rundir import resolve_checkpoint
from ..model.hf import load_pretrained
from ..model.parallel import sum_gradients
from .config import CompressionConfig
from .embedder import ExtensibleEmbedder, save_embedder
from .packing import freeze, packed_two_stream_loss


def validate_train(cfg) -> None:
    """ValueError naming the setting; the same on every rank (no communication involved)."""
    c: CompressionConfig = cfg.compression
    c.validate()
    if not cfg.train.init_from:
        raise ValueError("train.init_from=None: compression training needs the frozen LLM; valid: a Hugging Face "
                         "Llama directory or a training out_dir (e.g. outputs/demo/train)")
    if c.chunk_len < 2:
        raise ValueError(f"compression.chunk_len={c.chunk_len} must be at least 2 to have tokens to predict")
    if cfg.data.pack_documents:
        raise ValueError("data.pack_documents=true cannot be used with compression.enabled=true (the embedder trains on "
                         "windows of the token stream); valid: data.pack_documents=false")
    for name in ("steps", "grad_accum"):
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"train.{name}={getattr(cfg.train, name)} must be a positive integer")


def sample_ks(factors: list[int], n: int, *, seed: int, step: int, rank: int) -> list[int]:
    """One factor per example, a function of (seed, step, rank) only (reproducible, resumable)."""
    g = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
    return [factors[i] for i in torch.randint(len(factors), (n,), generator=g).tolist()]


def _out_of_time(mine: bool, world: int, device: torch.device) -> bool:
    """True on every rank once any rank's clock ran out (every rank stops at the same step)."""
    flag = torch.tensor(float(mine), device=device)
    if world > 1:
        dist.all_reduce(flag)
    return flag.item() > 0


def _frozen_llm(cfg):
    """(LLM directory, tokenizer, the frozen LLM in eval mode on the job device) from ``train.init_from``."""
    llm_dir, extra = resolve_checkpoint(cfg.train.init_from)
    tok = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer is not None else extra.get("tokenizer"))
    llm = freeze(load_pretrained(llm_dir)).to(devices.job_device()).eval()
    check_tokenizer(tok, llm.config)
    return llm_dir, tok, llm


def _adamw(params: list[torch.Tensor], t) -> torch.optim.AdamW:
    """AdamW over the embedder's trainable ``params``: weight decay on matrices only."""
    decay = [p for p in params if p.dim() >= 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=t.lr, betas=t.betas)


def _resume(ckpt_root: str, resume: bool, emb, opt, settings: dict):
    """(step, data position, checkpoint path or None): the newest complete checkpoint loaded into
    ``emb`` and ``opt`` (and this rank's RNG), or a fresh start."""
    found = checkpoint.latest(ckpt_root) if resume else None
    if found is None:
        return 0, 0, None
    meta = checkpoint.load(found, model=emb, optimizer=opt)
    _check_resumable(meta, settings, found)
    return meta["step"], meta["data_position"], found


def _embedder_step(llm, emb, params, opt, batches, *, c, t, factors: list[int], step: int, lr: float, rank: int, world: int):
    """One optimizer step over ``t.grad_accum`` micro-batches of ``batches``; returns (mean loss over
    the ranks, gradient norm before clipping), on the LLM's device (no host read here)."""
    device = devices.module_device(llm)
    for gr in opt.param_groups:
        gr["lr"] = lr
    total = torch.zeros((), dtype=torch.float64, device=device)
    for micro in range(t.grad_accum):
        tokens = next(batches)  # (B, n·c) on the CPU: grouped by k there, each group moved to the device
        ks = torch.tensor(sample_ks(factors, tokens.shape[0], seed=t.seed, step=step * t.grad_accum + micro, rank=rank))
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for k in ks.unique().tolist():
            s, n = packed_two_stream_loss(llm, emb, tokens[ks == k].to(device), chunk_len=c.chunk_len, k=k)
            loss_sum, count = loss_sum + s, count + n
        loss = loss_sum / count / t.grad_accum  # every rank scores the same number of tokens
        loss.backward()
        total += loss.detach()
    sum_gradients(params, None, divide_by=world)
    gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else float("nan")
    opt.step()
    opt.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return total, gnorm


def run_compression_train(cfg, logger: MetricsLogger | None = None) -> dict:
    """Train the embedder, or continue it from its newest checkpoint (module docstring); returns {"step",
    "loss", "losses" (this process's steps only), "embedder_dir", "checkpoint", "seconds"}. Works on one
    process or on an initialised default process group (every rank calls it)."""
    validate_train(cfg)
    c, t = cfg.compression, cfg.train
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    llm_dir, tok, llm = _frozen_llm(cfg)
    torch.manual_seed(t.seed)
    emb = ExtensibleEmbedder(llm, c.embedder_layers).train()  # on the LLM's device
    params = [p for p in emb.parameters() if p.requires_grad]
    opt = _adamw(params, t)
    factors = c.factors()
    settings = {"chunk_len": c.chunk_len, "train_chunks": c.train_chunks, "ks": factors, "embedder_layers": emb.n_layers}
    ckpt_root = os.path.join(t.out_dir, "embedder_checkpoints")
    step, position, found = _resume(ckpt_root, t.resume, emb, opt, settings)  # position: global batches consumed
    data = dataclasses.replace(cfg.data, seq_len=c.train_chunks * c.chunk_len - 1)  # windows of train_chunks x chunk_len tokens
    batches = train_batches(data, tok, replicas=world, replica=rank, skip=position)
    if logger is None:
        logger = MetricsLogger([ConsoleSink(), JsonlSink(os.path.join(t.out_dir, "metrics.jsonl"))], enabled=rank == 0)
    if found is not None:
        logger.log(step, resumed_from=str(found))
    losses: list[float] = []
    t_start = time.perf_counter()
    saved = step

    def save() -> None:
        nonlocal saved
        meta = {"data_position": position, "llm": llm_dir, **settings}
        checkpoint.save(ckpt_root, step, model=emb, optimizer=opt, meta=meta, keep_last=t.keep_last)
        saved = step

    while step < t.steps:
        lr = lr_at(step, t)
        total, gnorm = _embedder_step(llm, emb, params, opt, batches, c=c, t=t, factors=factors, step=step, lr=lr,
                                      rank=rank, world=world)
        position += t.grad_accum
        step += 1
        losses.append(total.item())  # the step's one host read
        if step % t.log_every == 0 or step == t.steps:
            logger.log(step, loss=losses[-1], lr=lr, grad_norm=gnorm)  # a device tensor: read by rank 0 only
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
            save()
        if c.train_minutes is not None and _out_of_time(time.perf_counter() - t_start > 60 * c.train_minutes, world,
                                                        devices.module_device(llm)):
            logger.log(step, stopped="compression.train_minutes reached")
            if saved != step:
                save()
            break
    return _finish(emb, cfg, llm_dir=llm_dir, factors=factors, step=step, losses=losses, ckpt_root=ckpt_root,
                   t_start=t_start, rank=rank)


def _finish(emb, cfg, *, llm_dir: str, factors: list[int], step: int, losses: list[float], ckpt_root: str, t_start: float,
            rank: int) -> dict:
    """Rank 0 writes the embedder to ``<train.out_dir>/embedder``; every rank waits for it; the result dict."""
    c, out = cfg.compression, os.path.join(cfg.train.out_dir, "embedder")
    if rank == 0:
        save_embedder(emb, out, extra={"llm": llm_dir, "chunk_len": c.chunk_len, "ks": factors, "steps": step,
                                       "train_chunks": c.train_chunks})
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "loss": losses[-1] if losses else None, "losses": losses, "embedder_dir": out,
            "checkpoint": str(checkpoint.latest(ckpt_root)), "seconds": time.perf_counter() - t_start}


def _check_resumable(meta: dict, settings: dict, path) -> None:
    """ValueError (the same on every rank: every rank reads the same meta) if the checkpoint was written
    with other settings than this run's: resuming would continue another data stream or model."""
    for name, want in settings.items():
        if meta.get(name) != want:
            setting = "compression.ks (or compression.k)" if name == "ks" else f"compression.{name}"
            raise ValueError(f"{setting}={want} but the checkpoint {path} was written with {meta.get(name)}; resume with "
                             f"the same settings, or start afresh with another train.out_dir or train.resume=false")
