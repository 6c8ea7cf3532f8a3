"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout under ``root``::

    step_00000100/          one complete checkpoint
        .metadata, *.distcp model + optimizer (DCP; replicated tensors are written once)
        rng_<rank>.pt       each rank's torch / python RNG state
        meta.json           step, data position, config; written LAST
    .step_00000200.tmp/     a save in progress (ignored; removed by the next save)

A save goes to the ``.tmp`` directory and is renamed into place by rank 0 after every rank has
finished, so a kill during a save leaves the previous checkpoint intact. ``latest(root)`` is the
highest complete ``step_*`` directory. Every rank calls ``save``/``load`` (DCP is collective).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

META = "meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p for p in r.glob("step_*") if p.is_dir() and (p / META).is_file())


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete(root)
    return found[-1] if found else None


def save(root: str | os.PathLike, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         meta: dict, keep_last: int = 0) -> Path:
    """Save model, optimizer, every rank's RNG and ``meta`` (JSON) as ``root/step_<step>``.

    ``keep_last`` > 0 deletes older checkpoints beyond that many (after the new one is in place).
    """
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        aside = root / f".step_{step:08d}.replaced"
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned run: move it
            shutil.rmtree(aside, ignore_errors=True)  # aside (never deleted before the new one is in place)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        if keep_last > 0:
            for old in complete(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer, and this rank's RNG) from a checkpoint; returns its meta."""
    p = Path(path)
    if not (p / META).is_file():
        raise ValueError(f"{p} is not a complete checkpoint (no {META}); complete ones: {[c.name for c in complete(p.parent)]}")
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, p)
        set_model_state_dict(model, state["model"])
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        _dcp_load(state, p)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = p / f"rng_{_rank()}.pt"
    if rng.is_file():
        r = torch.load(rng, weights_only=False)
        torch.set_rng_state(r["torch"])
        random.setstate(r["python"])
    return json.loads((p / META).read_text())


def _dcp_load(state: dict, p: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(p))
