"""``ringrt train``: AdamW with warm-up + cosine, clipping, accumulation, a (data x sequence) mesh,
fp32/bf16, periodic atomic checkpoints and resume, progress bar, loss and tokens/s logged.

One process, ``torchrun --nproc-per-node N -m ringrt train ...``, Slurm or MPI: the same command.
``run_train(cfg)`` is the job; ``main(args)`` only parses flags into a :class:`TrainJobConfig`.
The model and every tensor of a step live on :func:`ringrt.distributed.device.job_device` (a GPU per rank on a
CUDA node, else the CPU); the host reads one number per optimizer step (the loss).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist

from ..run import checkpoint
from ..distributed import device as devices
from ..ops.layout import num_chunks
from ..run.lr_schedule import lr_at
from ..run.metrics import ConsoleSink, JsonlSink, MetricsLogger, Telemetry, Throughput, progress_bar, say, train_flops_per_token
from ..data.batching import train_batches
from ..data.tokenizer import check_tokenizer, load_tokenizer
from ..model.hf import load_pretrained, save_pretrained
from ..model.llama import Llama
from ..model.parallel import chunked_sequence_loss, make_attend, mesh, sequence_loss, shard_batch, sum_gradients
from . import interrupt
from .config import TrainConfig, TrainJobConfig
from .flags import add_dataclass_arguments, build


def validate(cfg: TrainJobConfig, sp: int) -> None:
    """ValueError naming the setting if ``cfg`` cannot train over ``sp`` sequence-parallel ranks;
    no communication (the demo checks its settings with it before starting any rank)."""
    t = cfg.train
    for name in ("steps", "grad_accum"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name}={getattr(t, name)} must be a positive integer")
    if t.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision={t.precision!r}; valid: 'fp32', 'bf16'")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        raise ValueError(f"train.lr={t.lr} and train.min_lr={t.min_lr} must satisfy 0 <= min_lr <= lr, lr > 0")
    _validate_memory(t)
    cfg.data.validate()
    layout = cfg.attention.resolved_layout()
    n = num_chunks(layout, sp)
    if cfg.data.pack_documents:
        if cfg.attention.lambda_mask:
            raise ValueError("data.pack_documents=true cannot be used with attention.lambda_mask=true: the Λ-mask attention "
                             "does not take document boundaries; valid: attention.lambda_mask=false")
        return  # any length: every document is padded to a multiple of n on its own
    if cfg.data.seq_len % n:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} cannot be split by layout={layout!r} over {sp} sequence-parallel "
            f"ranks: it must be a multiple of {n}; e.g. {max(n, cfg.data.seq_len - cfg.data.seq_len % n)}"
        )


def _optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": plain, "weight_decay": 0.0}],
                             lr=t.lr, betas=t.betas, fused=False)


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: bf16 autocast on ``device``'s type, or nothing for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _validate_memory(t: TrainConfig) -> None:
    if t.activation_checkpointing not in ("none", "layers"):
        raise ValueError(f"train.activation_checkpointing={t.activation_checkpointing!r}; valid: 'none', 'layers'")
    if isinstance(t.loss_chunk, bool) or not isinstance(t.loss_chunk, int) or t.loss_chunk < 0:
        raise ValueError(f"train.loss_chunk={t.loss_chunk!r} must be an int >= 0 (0 = the full logits)")


def micro_loss(model, sh, *, t: TrainConfig, attend, seq_group, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The loss of one shard under ``t``'s memory settings: per-layer checkpointing
    (``t.activation_checkpointing``) and the LM head + loss in chunks (``t.loss_chunk``)."""
    ckpt = t.activation_checkpointing == "layers"
    with autocast():
        out = model(sh.input_ids, positions=sh.positions, attend=attend, cu_seqlens=sh.cu_seqlens, hidden_only=t.loss_chunk > 0,
                    checkpoint=ckpt)  # (B, S_local, V), or (B, S_local, dim) hidden states
        if t.loss_chunk > 0:
            return chunked_sequence_loss(out, model.lm_head.weight, sh.labels, seq_group, chunk=t.loss_chunk)
    return sequence_loss(out, sh.labels, seq_group)


def train_step(model, opt, batches, *, t: TrainConfig, lr: float, layout: str, attend, seq_group, data_group,
               autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``t.grad_accum`` micro-batches of ``batches`` (CPU (B, S + 1) token
    batches, or packed batches: ``ringrt.data.packing.PackedBatch``); returns (mean loss over the
    data replicas, gradient norm before clipping), 0-dim tensors on the model's device. Nothing is
    read back to the host here.
    """
    device = devices.module_device(model)
    for g in opt.param_groups:
        g["lr"] = lr
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(t.grad_accum):
        sh = shard_batch(next(batches), layout=layout, group=seq_group, device=device)
        loss = micro_loss(model, sh, t=t, attend=attend, seq_group=seq_group, autocast=autocast) / t.grad_accum
        loss.backward()
        total += loss.detach().double()
    params = [p for p in model.parameters()]
    sum_gradients(params, None, divide_by=t.data_parallel)
    if t.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    else:
        gnorm = torch.full((), float("nan"), device=device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if data_group is not None:
        dist.all_reduce(total, group=data_group)
        total /= t.data_parallel
    return total, gnorm


def default_logger(cfg: TrainJobConfig, *, enabled: bool) -> MetricsLogger:
    """The plain CLI's metrics: console lines and ``<out_dir>/metrics.jsonl`` with the same columns
    as under Hydra (:class:`ringrt.run.metrics.Telemetry`: flops_per_s, peak_mem_bytes, comm_bytes)."""
    if not enabled:
        return MetricsLogger([], enabled=False)
    m = cfg.model
    if cfg.train.init_from:
        from ..model.hf import read_config

        m = read_config(cfg.train.init_from)
    fpt = train_flops_per_token(n_params=_n_params(m), n_layers=m.n_layers, dim=m.dim, seq_len=cfg.data.seq_len, causal=True)
    sinks = [ConsoleSink(), JsonlSink(os.path.join(cfg.train.out_dir, "metrics.jsonl"))]
    return MetricsLogger([Telemetry(sinks, flops_per_token=fpt)])


def _n_params(m) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in Llama(m).parameters())


def run_train(cfg: TrainJobConfig, logger: MetricsLogger | None = None) -> dict:
    """Train; returns {"step", "loss", "losses", "tokens_per_s", "hf_dir", "checkpoint", "resumed_from"}.

    ``loss`` is None and ``losses`` empty when the checkpoint found had already reached
    ``train.steps`` (nothing to do; it says so). Works on one process or on an initialised default
    process group (every rank calls it). The model runs on :func:`ringrt.distributed.device.job_device`.
    """
    if cfg.compression.enabled:
        from ..compression.train import run_compression_train

        return run_compression_train(cfg, logger)
    t = cfg.train
    rank = dist.get_rank() if dist.is_initialized() else 0
    seq_group, data_group, dp_rank, sp = mesh(t.data_parallel)
    validate(cfg, sp)
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(t.seed)
    model = (load_pretrained(t.init_from) if t.init_from else Llama(cfg.model)).to(devices.job_device())
    model.train()
    check_tokenizer(tok, model.config)
    layout = cfg.attention.resolved_layout()
    attend = make_attend(cfg.attention, model.config, train_len=cfg.data.seq_len, group=seq_group)
    opt = _optimizer(model, t)

    ckpt_root = os.path.join(t.out_dir, "checkpoints")
    step, position = 0, 0
    found = checkpoint.latest(ckpt_root) if t.resume else None
    if found is not None:
        meta = checkpoint.load(found, model=model, optimizer=opt)
        step, position = meta["step"], meta["data_position"]
    interrupt.note(step=step, checkpoints=ckpt_root)
    if logger is None:
        logger = default_logger(cfg, enabled=rank == 0)
    if found is not None:
        logger.log(step, resumed_from=str(found))
        if step >= t.steps and rank == 0:
            say(f"already trained to step {step} of {t.steps} (checkpoint in {os.path.abspath(found)}); nothing to do")

    batches = train_batches(cfg.data, tok, replicas=t.data_parallel, replica=dp_rank, skip=position)
    autocast = autocast_for(t.precision, devices.module_device(model))
    speed = Throughput(t.data_parallel * cfg.data.batch_size * cfg.data.seq_len * t.grad_accum)
    losses: list[float] = []
    meta = lambda: {"data_position": position, "train_len": cfg.data.seq_len, "tokenizer": cfg.data.tokenizer}  # noqa: E731
    with progress_bar(total=t.steps, initial=step, desc="train", show=rank == 0 and t.progress and step < t.steps) as bar:
        while step < t.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            total, gnorm = train_step(model, opt, batches, t=t, lr=lr, layout=layout, attend=attend, seq_group=seq_group,
                                      data_group=data_group, autocast=autocast)
            position += t.grad_accum
            step += 1
            losses.append(total.item())  # the step's one host read (it also waits for the step to finish)
            speed.add(time.perf_counter() - t0)
            interrupt.note(step=step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % t.log_every == 0 or step == t.steps:  # gnorm: read by rank 0 only
                logger.log(step, loss=losses[-1], lr=lr, grad_norm=gnorm, tokens_per_s=speed.take())
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
                with interrupt.deferred():  # a Ctrl-C now stops the run once this checkpoint is complete
                    checkpoint.save(ckpt_root, step, model=model, optimizer=opt, meta=meta(), keep_last=t.keep_last)
    hf_dir = os.path.join(t.out_dir, "hf")
    if rank == 0:
        save_pretrained(model, hf_dir, extra={"train_len": cfg.data.seq_len, "tokenizer": cfg.data.tokenizer, "step": step})
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "loss": losses[-1] if losses else None, "losses": losses, "tokens_per_s": speed.run_mean(),
            "hf_dir": hf_dir, "checkpoint": str(checkpoint.latest(ckpt_root)),
            "resumed_from": str(found) if found is not None else None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(p, TrainJobConfig)


def main(args: argparse.Namespace) -> int:
    from ..distributed.launcher import init_distributed, program_argv

    cfg = build(TrainJobConfig, args)
    given = any(a.split("=", 1)[0] == "--train.out_dir" for a in program_argv())
    interrupt.note(resume=[] if given else ["--train.out_dir", os.path.abspath(cfg.train.out_dir)])
    with interrupt.stops_cleanly("training"):
        init_distributed()
        run_train(cfg)
    return 0
