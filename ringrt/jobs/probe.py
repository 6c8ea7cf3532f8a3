"""``ringrt probe``: a tiny distributed job that proves a launch works end to end.

Every rank joins the process group through :func:`ringrt.distributed.launcher.init_distributed` (torchrun,
Slurm, MPI or a single process), builds the same random q/k/v from a seed (drawn on the CPU, then
moved to :func:`ringrt.distributed.device.job_device`: its GPU on a CUDA node), runs ``ringrt.attention``
forward and backward on its shard there, and compares output and gradients against a
single-process fp64 reference computed on the same device. Rank 0 writes the result as JSON
atomically (each rank's entry names its device); the exit code is 0 only if every rank passed.

    NPROC_PER_NODE=2 ./launch/run.sh -m ringrt.jobs.probe --out probe.json    # one node: listens on 127.0.0.1 only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..distributed import device as devices
from ..distributed.launcher import init_distributed, shutdown


@dataclass(kw_only=True, slots=True)
class ProbeConfig:
    """Shape of the probe problem and where its result goes."""

    batch: int = 1
    """Sequences in the batch."""
    seq_len: int = 64
    """Full sequence length; a multiple of 2 x world size (zigzag layout)."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (GQA); must divide ``heads``."""
    head_dim: int = 16
    """Size of each head."""
    causal: bool = True
    """Causal attention (zigzag layout); false = non-causal over contiguous shards."""
    seed: int = 0
    """Seeds q, k, v and the output gradient (the same on every rank)."""
    out: str = ""
    """JSON result written by rank 0 (empty: print only)."""
    backend: str = "auto"
    """Process-group backend: auto (gloo, plus NCCL for CUDA tensors when there is a GPU), gloo or nccl."""
    timeout_s: float = 120.0
    """Seconds the process group waits for a peer before giving up."""

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name}={getattr(self, name)} must be >= 1")
        if self.heads % self.kv_heads:
            raise ValueError(f"probe.heads={self.heads} must be a multiple of probe.kv_heads={self.kv_heads}")


def _reference(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v in the dtype and on the device of the inputs; (B, S, H, D)
    layout, GQA repeated."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def _ref_with_grads(q, k, v, dout, causal: bool, dtype: torch.dtype):
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = _reference(*leaves, causal)
    out.backward(dout.to(dtype))
    return out.detach(), [x.grad for x in leaves]


def run_probe(cfg: ProbeConfig) -> dict:
    """Run the probe on every rank; returns the result (identical on every rank)."""
    import ringrt

    env = init_distributed(cfg.backend, cfg.timeout_s)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.seq_len % (2 * world):
        raise ValueError(f"probe.seq_len={cfg.seq_len} must be a multiple of 2 x world size = {2 * world}")
    device = devices.job_device()
    g = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same numbers on every rank and device
    shape_q = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    q, k, v, dout = (torch.randn(s, generator=g).to(device) for s in (shape_q, shape_kv, shape_kv, shape_q))
    layout = "zigzag" if cfg.causal else "contiguous"

    local = [ringrt.shard(x, layout=layout).clone().requires_grad_() for x in (q, k, v)]
    out = ringrt.attention(*local, causal=cfg.causal, layout=layout)
    out.backward(ringrt.shard(dout, layout=layout))
    got = [out.detach()] + [x.grad for x in local]

    ref64_out, ref64_grads = _ref_with_grads(q, k, v, dout, cfg.causal, torch.float64)
    ref32_out, ref32_grads = _ref_with_grads(q, k, v, dout, cfg.causal, torch.float32)
    names = ("out", "dq", "dk", "dv")
    err_t, ref_t = [], []
    for x, r64, r32 in zip(got, [ref64_out, *ref64_grads], [ref32_out, *ref32_grads], strict=True):
        r64_local, r32_local = ringrt.shard(r64, layout=layout), ringrt.shard(r32, layout=layout)
        err_t.append((x.double() - r64_local).abs().max())
        ref_t.append((r32_local.double() - r64_local).abs().max())
    read = torch.stack(err_t + ref_t).tolist()  # the one host read
    errs = dict(zip(names, read[: len(names)], strict=True))
    # An fp32 computation may be off by at most twice what plain fp32 PyTorch is off by (+ one ulp-ish floor).
    tols = {n: 2 * r + 1e-6 for n, r in zip(names, read[len(names) :], strict=True)}
    me = {
        "rank": rank, "local_rank": env.local_rank, "host": socket.gethostname(), "pid": os.getpid(),
        "device": str(device), "launcher": env.source, "ok": all(errs[n] <= tols[n] for n in names),
        "max_abs_err": errs, "tolerance": tols,
    }
    ranks = [me]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, me)
    result = {
        "ok": all(r["ok"] for r in ranks), "world_size": world, "launcher": env.source,
        "config": asdict(cfg), "ranks": ranks,
    }
    if rank == 0 and cfg.out:
        from ..run.rundir import atomic_write_json

        atomic_write_json(cfg.out, result)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--seq-len 48``: a flag per :class:`ProbeConfig` field (hyphens for underscores)."""
    from .flags import add_field

    for name, default in asdict(ProbeConfig()).items():
        add_field(p, ProbeConfig, name, default, flag="--" + name.replace("_", "-"), dest=name, bool_metavar="BOOL")


def main(args: argparse.Namespace) -> int:
    from .flags import build
    from .interrupt import stops_cleanly

    cfg = build(ProbeConfig, args)
    with stops_cleanly("probe"):
        result = run_probe(cfg)
        if dist.is_initialized():
            dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({k: result[k] for k in ("ok", "world_size", "launcher")}), flush=True)
    shutdown()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m ringrt.jobs.probe", description=__doc__.splitlines()[0])
    add_arguments(_p)
    _args = _p.parse_args()
    try:
        _code = main(_args)
    except ValueError as _e:
        from ..run.errors import is_user_error, user_error

        if not is_user_error(_e):
            raise
        _code = user_error(_p.prog, _e)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)  # skip interpreter teardown, where gloo threads can abort the process
