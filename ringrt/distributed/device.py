"""The one place that decides which device a job's tensors live on.

Every job (train, eval, generate, demo, probe, compression train/eval, the DeepSpeed engine) puts
its model on :func:`job_device` and every tensor it creates on the model's device
(:func:`module_device`): batches, labels, positions, masks, loss totals, metrics.

``job_device()`` is, in order:

* ``RINGRT_DEVICE=cpu``: the CPU, even on a GPU node (with ``launcher.backend=auto`` CPU tensors
  travel over the gloo half of the process group);
* ``RINGRT_DEVICE=cuda``: this rank's CUDA device (below); ValueError without CUDA or when the
  process group cannot carry CUDA tensors over NCCL;
* ``RINGRT_DEVICE=auto`` (or unset): that CUDA device when CUDA is available and either no process
  group is initialised (one process) or the default group carries CUDA tensors over NCCL
  (``launcher.backend`` ``auto`` or ``nccl`` on a GPU node); else the CPU.

This rank's CUDA device is the one the default process group is bound to, else the current one.
:func:`ringrt.distributed.launcher.init_distributed` makes ``local_rank % torch.cuda.device_count()``
(:func:`cuda_index`) current and binds NCCL to it: 8 ranks on one 8-GPU node get cuda:0..7; a
Slurm task that sees one GPU (``--gpus-per-task=1``, one CUDA_VISIBLE_DEVICES entry per task) gets
cuda:0 whatever its local rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DEVICE_ENV = "RINGRT_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def cuda_index(local_rank: int) -> int:
    """The CUDA device of the process with this node-local rank: ``local_rank % visible devices``.

    ValueError when no CUDA device is visible.
    """
    n = torch.cuda.device_count()
    if n < 1:
        raise ValueError(f"no CUDA device is visible to local rank {local_rank} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return local_rank % n


def _choice() -> str:
    choice = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]!r} is not valid; valid: {', '.join(DEVICE_CHOICES)}")
    return choice


def job_device() -> torch.device:
    """The device this process's job runs on (see the module docstring for the rule)."""
    choice = _choice()
    if choice == "cpu":
        return torch.device("cpu")
    from .comm import backend_for, is_nccl

    group_ok = not (dist.is_available() and dist.is_initialized()) or is_nccl(None, "cuda")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False; valid here: cpu, auto")
        if not group_ok:
            raise ValueError(f"{DEVICE_ENV}=cuda but the process group carries CUDA tensors over "
                             f"{backend_for(None, 'cuda')!r}; valid: launcher.backend=auto or nccl")
    elif not (torch.cuda.is_available() and group_ok):
        return torch.device("cpu")
    bound = getattr(dist.group.WORLD, "bound_device_id", None) if dist.is_available() and dist.is_initialized() else None
    return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (its first parameter; cpu for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def wrong_cuda_device(device: torch.device, current: int) -> str | None:
    """A message when ``device`` is a CUDA device other than the current one (index ``current``).

    NCCL and the CUDA kernels run on the current device's stream: a tensor on another GPU meets a
    communicator bound to the wrong GPU (a hang or an NCCL error far from the cause).
    """
    if device.type != "cuda" or device.index is None or device.index == current:
        return None
    return (f"q is on {device} but the current CUDA device is cuda:{current}; call "
            f"torch.cuda.set_device({device.index}) before the first collective (ringrt.distributed.launcher.init_distributed does it: "
            f"local_rank % device_count) or move the tensors to cuda:{current}")
