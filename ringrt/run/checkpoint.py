"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically, verified
before loading.

Layout under ``root``::

    step_00000100/          one complete checkpoint
        .metadata, *.distcp model + optimizer (DCP; replicated tensors are written once)
        rng_<rank>.pt       each rank's torch / python RNG state (tensors, tuples, ints: loads weights_only)
        meta.json           step, data position, config
        manifest.json       size and SHA-256 of every other file; written LAST
    .step_00000200.tmp/     a save in progress (ignored; removed by the next save)

A save goes to the ``.tmp`` directory and is renamed into place by rank 0 after every rank has
finished, so a kill during a save leaves the previous checkpoint intact. ``latest(root)`` is the
highest complete ``step_*`` directory. Every rank calls ``save``/``load`` (DCP is collective).

Loading unpickles files of the checkpoint, i.e. runs code it names, so ``load`` first checks the
trust boundary of :mod:`ringrt.run.checkpoint_trust` (owned by you or root, not writable by others, every
file as the manifest says) and refuses, on every rank, a checkpoint that fails it. A tampered newest
checkpoint is an error, not a reason to fall back silently to an older one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from . import checkpoint_trust as trust
from .checkpoint_trust import MANIFEST, TRUST_ENV  # noqa: F401  (re-exported)

META = "meta.json"
_STEP = re.compile(r"step_(\d+)")


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
    found = [p for p in r.glob("step_*") if _STEP.fullmatch(p.name) and p.is_dir() and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None (not verified here: ``load`` does)."""
    found = complete(root)
    return found[-1] if found else None


def save(root: str | os.PathLike, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         meta: dict, keep_last: int = 0) -> Path:
    """Save model, optimizer, every rank's RNG and ``meta`` (JSON) as ``root/step_<step>``.

    ``keep_last`` > 0 deletes checkpoints of earlier steps beyond that many in all (after the new one is
    in place; the new one is never deleted, nor are checkpoints of later steps).
    """
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".step_{step:08d}.tmp"
    if _rank() == 0:
        if root.is_dir():
            loose = trust.loose_permissions(root)
            if loose:
                warnings.warn(f"checkpoints saved under {root} cannot be loaded until this is fixed: {loose}", stacklevel=2)
        else:
            root.mkdir(parents=True)
            trust.tighten(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    buf = io.BytesIO()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, buf)
    _write_synced(tmp / f"rng_{_rank()}.pt", buf.getvalue())
    _barrier()
    r = _rank()  # what this rank wrote: its RNG and its DCP files (DCP names them __<rank>_<n>.distcp)
    mine = [n for n in os.listdir(tmp) if n == f"rng_{r}.pt" or (n.startswith(f"__{r}_") and n.endswith(".distcp"))]
    files = trust.hash_saved_files(tmp, mine)
    if r == 0:
        meta_bytes = (json.dumps({"step": step, **meta}, indent=2) + "\n").encode()
        _write_synced(tmp / META, meta_bytes)
        files[META] = {"bytes": len(meta_bytes), "sha256": hashlib.sha256(meta_bytes).hexdigest()}
        _write_synced(tmp / MANIFEST, trust.manifest_text(step, files).encode())
        for name in os.listdir(tmp):  # files written under umask 002 must still pass load's check
            trust.tighten(tmp / name)
        trust.tighten(tmp)
        _fsync_dir(tmp)
        aside = root / f".step_{step:08d}.replaced"
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned run: move it
            shutil.rmtree(aside, ignore_errors=True)  # aside (never deleted before the new one is in place)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
        if keep_last > 0:
            earlier = [c for c in complete(root) if int(c.name[5:]) < step]
            for old in earlier[:max(0, len(earlier) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         trust_unverified: bool | None = None) -> dict:
    """Restore model (and optimizer, and this rank's RNG) from a checkpoint; returns its meta.

    Refuses (``ValueError`` on every rank, before anything is unpickled) a checkpoint that is writable
    by others, not owned by you or root, or whose files differ from its manifest. One without a manifest
    (written by an older ringrt) loads only with ``trust_unverified=True``; None reads
    ``RINGRT_TRUST_UNVERIFIED_CHECKPOINTS``.
    """
    p = Path(path)
    if not (p / META).is_file():
        raise ValueError(f"{p} is not a complete checkpoint (no {META}); complete ones: {[c.name for c in complete(p.parent)]}")
    trust.verify(p, trust_unverified=trust_unverified)
    what = "model" if optimizer is None else "model and optimizer"
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            _dcp_load(state, p)
            set_model_state_dict(model, state["model"])
        else:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
            _dcp_load(state, p)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise RuntimeError(f"checkpoint {p.name} ({p}): restoring the {what} failed: {_describe(e)}") from e
    rng = p / f"rng_{_rank()}.pt"
    if rng.is_file():
        try:
            r = torch.load(rng, weights_only=True)  # tensors, tuples and ints only: runs no code
            torch.set_rng_state(r["torch"])
            random.setstate(r["python"])
        except Exception as e:
            raise ValueError(f"checkpoint {p.name} ({p}): {rng.name} is not an RNG state ringrt wrote "
                             f"({type(e).__name__}: {e})") from e
    return json.loads((p / META).read_text())


def _dcp_load(state: dict, p: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(p))


def _describe(e: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (its str is every rank's traceback)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, (x, _) in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entries in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
