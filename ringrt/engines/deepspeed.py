"""DeepSpeed ZeRO (stage 1-3) around a sequence-parallel model.

The ranks form a (data x sequence) mesh (``ringrt.model.parallel.mesh``): ranks [i*sp, (i+1)*sp)
shard one sequence, replicas are data-parallel. DeepSpeed is told the mesh through an ``mpu``
object, so its data-parallel group is the replica group (it excludes the sequence dimension) and
ZeRO partitions and reduces over the sequence-data group (all dp x sp ranks): every sequence rank's
gradient is the share of its own tokens, summed over the sequence group and averaged over replicas,
the same as the plain trainer's ``sum_gradients(divide_by=data_parallel)``.

    torchrun --nproc-per-node 2 launch/train.py engine=deepspeed deepspeed.zero_stage=2

Needs ``pip install 'ringrt[deepspeed]'``; on CPU ``DS_ACCELERATOR=cpu`` (``launch/train.py`` sets it
when there is no GPU). The optimizer is ``torch.optim.AdamW`` through ``"torch_adam": true``.
The engine runs on :func:`ringrt.distributed.device.job_device` (DeepSpeed is told its CUDA index, so a rank
that sees one GPU uses cuda:0 whatever its local rank); batches and loss totals follow it.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from ..distributed import device as devices
from ..jobs.config import TrainConfig, TrainJobConfig
from ..model.parallel import sequence_loss, shard_batch


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 1
    """1: optimizer state partitioned; 2: + gradients; 3: + parameters."""
    overrides: dict = field(default_factory=dict)
    """Merged last into the generated DeepSpeed JSON config (e.g. offload settings)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage!r} is not valid; valid: 1, 2, 3")


class MeshMPU:
    """DeepSpeed's model-parallel-unit interface over a (data x sequence) mesh; no tensor parallelism.

    Collective: every rank constructs it (it creates process groups).
    """

    def __init__(self, seq_group, data_group):
        world, rank = dist.get_world_size(), dist.get_rank()
        singles = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates all
        self._self = singles[rank]
        self._seq = seq_group if seq_group is not None else dist.group.WORLD
        self._data = data_group if data_group is not None else self._self
        self._world = dist.group.WORLD

    # tensor/model parallel: one rank
    def get_model_parallel_group(self):
        return self._self

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    # data parallel: replicas of the whole sequence
    def get_data_parallel_group(self):
        return self._data

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._data)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._data)

    # sequence parallel: the ranks sharding one sequence
    def get_sequence_parallel_group(self):
        return self._seq

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(self._seq)

    def get_sequence_parallel_world_size(self) -> int:
        return dist.get_world_size(self._seq)

    def get_sequence_data_parallel_group(self):
        return self._world

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size()


def sum_over_sequence(module: torch.nn.Module, seq_group) -> None:
    """Make every parameter's gradient the sum over the sequence group as it is produced.

    ZeRO-3 in DeepSpeed 0.19.8 does not add up the sequence ranks' partial gradients (measured:
    its full gradient is a mix of per-rank partials), while stages 1-2 do. With this hook every
    sequence rank hands ZeRO-3 the same full gradient of its replica, which ZeRO then averages over
    the (data x sequence) ranks: the replica mean, as in the plain trainer.
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=seq_group)
        return grad

    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(hook)


def ds_config(cfg: TrainJobConfig, ds: DeepSpeedConfig) -> dict:
    """The DeepSpeed JSON config equivalent to ``cfg.train`` (AdamW, clipping, accumulation, bf16)."""
    t = cfg.train
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * t.data_parallel,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                    "weight_decay": t.weight_decay, "torch_adam": True}},
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    conf.update(ds.overrides)
    return conf


def engine_args(device: torch.device) -> SimpleNamespace | None:
    """The ``args`` for ``deepspeed.initialize`` that put the engine on ``device``.

    DeepSpeed puts the engine on ``args.device_rank`` if given, else on LOCAL_RANK, which is out of
    range where each rank sees one GPU (Slurm ``--gpus-per-task=1``). None for the CPU.
    """
    return SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None


def deepspeed_step(engine, batches, *, t: TrainConfig, lr: float, layout: str, attend, seq_group, data_group) -> torch.Tensor:
    """One optimizer step of ``engine`` over ``t.grad_accum`` micro-batches of ``batches`` (CPU
    (B, S + 1) token batches, each rank's shard moved to ``engine.device``); returns the mean loss
    over the data replicas, a 0-dim fp64 tensor on ``engine.device`` (no host read here)."""
    device = torch.device(engine.device)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(t.grad_accum):
        sh = shard_batch(next(batches), layout=layout, group=seq_group, device=device)
        logits = engine(sh.input_ids, positions=sh.positions, attend=attend, cu_seqlens=sh.cu_seqlens)  # (B, S_local, V)
        loss = sequence_loss(logits, sh.labels, seq_group)
        engine.backward(loss)  # DeepSpeed divides by grad_accum itself
        engine.step()
        total += loss.detach().double() / t.grad_accum
    if data_group is not None:
        dist.all_reduce(total, group=data_group)
        total /= t.data_parallel
    return total


def run_train_deepspeed(cfg: TrainJobConfig, ds: DeepSpeedConfig, logger=None) -> dict:
    """Train ``cfg`` with a DeepSpeed ZeRO engine; returns {"step", "loss", "losses", "tokens_per_s"}.

    Same model, data order, loss, LR schedule and clipping as :func:`ringrt.jobs.train.run_train`
    (no DCP checkpoints: DeepSpeed's ``engine.save_checkpoint`` is the way with this engine).
    """
    import deepspeed

    from ..data.batching import train_batches
    from ..data.tokenizer import check_tokenizer, load_tokenizer
    from ..jobs.train import validate
    from ..distributed.launcher import detect
    from ..run.lr_schedule import lr_at
    from ..run.metrics import Throughput
    from ..model.hf import load_pretrained
    from ..model.llama import Llama
    from ..model.parallel import make_attend, mesh

    if cfg.compression.enabled:
        raise ValueError("compression.enabled=true is not supported with engine=deepspeed; valid: engine=torch "
                         "(the extensible embedder trains with the plain trainer)")
    if not dist.is_initialized():
        raise ValueError("engine=deepspeed needs a launcher (DeepSpeed runs on an initialised process group): start it with "
                         "torchrun, e.g. `torchrun --nproc-per-node=2 launch/train.py engine=deepspeed ...`, or use engine=torch "
                         "on one process")
    t = cfg.train
    seq_group, data_group, dp_rank, sp = mesh(t.data_parallel)
    validate(cfg, sp)
    mpu = MeshMPU(seq_group, data_group)
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(t.seed)
    model = load_pretrained(t.init_from) if t.init_from else Llama(cfg.model)
    check_tokenizer(tok, model.config)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    device = devices.job_device()
    os.environ.setdefault("LOCAL_RANK", str(detect().local_rank))  # DeepSpeed insists on it (Slurm/MPI set none)
    engine, _, _, _ = deepspeed.initialize(args=engine_args(device), model=model, model_parameters=groups,
                                           config=ds_config(cfg, ds), mpu=mpu)
    if torch.device(engine.device).type != device.type:
        raise ValueError(f"DeepSpeed's accelerator put the engine on {engine.device}, but the job runs on {device}; "
                         f"valid: DS_ACCELERATOR=cpu with RINGRT_DEVICE=cpu (or no GPU), else a CUDA job device")
    if ds.zero_stage == 3 and sp > 1:
        sum_over_sequence(engine.module, seq_group)
    layout = cfg.attention.resolved_layout()
    attend = make_attend(cfg.attention, model.config, train_len=cfg.data.seq_len, group=seq_group)
    batches = train_batches(cfg.data, tok, replicas=t.data_parallel, replica=dp_rank)
    speed = Throughput(t.data_parallel * cfg.data.batch_size * cfg.data.seq_len * t.grad_accum)
    losses = []
    for step in range(t.steps):
        t0 = time.perf_counter()
        total = deepspeed_step(engine, batches, t=t, lr=lr_at(step, t), layout=layout, attend=attend,
                               seq_group=seq_group, data_group=data_group)
        losses.append(total.item())  # the step's one host read
        speed.add(time.perf_counter() - t0)
        if logger is not None and ((step + 1) % t.log_every == 0 or step + 1 == t.steps):
            logger.log(step + 1, loss=losses[-1], lr=lr_at(step, t), grad_norm=grad_norm(engine),
                       tokens_per_s=speed.take())
    return {"step": t.steps, "loss": losses[-1] if losses else None, "losses": losses, "tokens_per_s": speed.run_mean(),
            "engine": engine}


def grad_norm(engine) -> float:
    """The global gradient norm of the engine's last step, before clipping (the plain trainer's
    ``grad_norm``); NaN where DeepSpeed has none (no step yet)."""
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if hasattr(g, "item") else g)
