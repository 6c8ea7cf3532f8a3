"""What a checkpoint must satisfy before anything in it is unpickled: the trust boundary.

Loading a torch.distributed.checkpoint (DCP) directory unpickles files from it (DCP reads
``.metadata`` with ``pickle.load`` and non-tensor state with ``torch.load(weights_only=False)``), and
unpickling runs whatever code the file names. So a checkpoint is code, and ringrt loads only one that

1. **nobody else can change**: the checkpoint root, the step directory and every file in it are owned
   by you or root and not writable by group or others (as ssh refuses loose key files), and
2. **is what was saved**: every file matches the SHA-256 and size recorded in ``manifest.json`` at save
   time, and no file is missing or added.

(1) is what makes (2) mean something: the manifest proves the files are the ones written with it, not
who wrote them; whoever can write the directory can write a matching manifest. Together they give
"a checkpoint directory you (or root) own and nobody else can write, unchanged since it was saved".
The directories above the checkpoint root are not checked (shared project directories are often
group-writable on purpose); resuming under one trusts everyone who can write it.

Checkpoints without a manifest (written by ringrt before it wrote one) are refused unless the caller
opts in with ``trust_unverified=True`` or ``RINGRT_TRUST_UNVERIFIED_CHECKPOINTS=1``.

Hashing is split over the ranks: at save each rank hashes the files it wrote and rank 0 writes the
manifest; at load each rank hashes a share of the files and the verdicts are all-gathered, so every
rank raises the same error before any of them starts the collective DCP load.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
FORMAT = "ringrt-checkpoint-manifest/1"
TRUST_ENV = "RINGRT_TRUST_UNVERIFIED_CHECKPOINTS"
_CHUNK = 1 << 20


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj):
    """``obj`` of every rank, by rank (just ``[obj]`` without a process group)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def trust_unverified_from_env() -> bool:
    """``RINGRT_TRUST_UNVERIFIED_CHECKPOINTS``: 1/true/yes or 0/false/no/unset."""
    raw = os.environ.get(TRUST_ENV, "")
    v = raw.strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{TRUST_ENV}={raw!r} is not valid; valid: 1/true/yes to load checkpoints without a manifest, "
                     f"0/false/no or unset to refuse them")


# ---- (1) permissions -------------------------------------------------------------------------------

def _owner_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def loose_permissions(path: Path, st: os.stat_result | None = None) -> str | None:
    """Why ``path`` could be changed by someone other than you or root, or None."""
    st = os.stat(path) if st is None else st
    euid = _euid()
    if euid is None:  # no POSIX owners (Windows): nothing to check
        return None
    mode = f"mode {stat.filemode(st.st_mode)} ({stat.S_IMODE(st.st_mode):04o}), owner {_owner_name(st.st_uid)}"
    if st.st_uid not in (euid, 0):
        return (f"{path} is owned by {_owner_name(st.st_uid)}, not by you ({_owner_name(euid)}) or root ({mode}): "
                f"its owner can change what loading it runs; fix: copy the checkpoint into a directory you own "
                f"(cp -r) and load the copy")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} is writable by group/others ({mode}): anyone who can write it can make loading it run "
                f"their code; fix: chmod go-w {path}")
    return None


def permission_problems(step: Path) -> list[str]:
    """Loose permissions on the checkpoint root, the step directory and its entries."""
    problems = []
    for d in (step.parent, step):
        try:
            why = loose_permissions(d)
        except OSError as e:
            why = f"{d}: cannot stat ({e})"
        if why:
            problems.append(why)
    for entry in sorted(os.scandir(step), key=lambda e: e.name):
        if entry.is_symlink():
            problems.append(f"{entry.path} is a symlink; a checkpoint holds only regular files")
            continue
        try:
            why = loose_permissions(Path(entry.path), entry.stat(follow_symlinks=False))
        except OSError as e:
            why = f"{entry.path}: cannot stat ({e})"
        if why:
            problems.append(why)
    return problems


def tighten(path: Path) -> None:
    """Drop group/other write bits (a save under umask 002 must still be loadable)."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


# ---- (2) the manifest ------------------------------------------------------------------------------

def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files split over ``world`` ranks, largest first onto the least loaded (same on every rank)."""
    load, out = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[name]
        out[r].append(name)
    return out


def _digest(path: Path) -> dict:
    return {"bytes": os.stat(path).st_size, "sha256": sha256_file(path)}


def hash_saved_files(directory: Path, mine: list[str]) -> dict[str, dict] | None:
    """``{name: {"bytes", "sha256"}}`` of every file in ``directory``, on rank 0 (None elsewhere).

    Collective under a process group: each rank hashes ``mine`` (the files it wrote, while they are
    likely still in its page cache); rank 0 takes those digests for the files it sees with the same
    size and hashes whatever is left itself, so a digest is never missing whatever the ranks see.
    """
    rank, _ = _world()
    gathered = _all_gather({n: _digest(directory / n) for n in mine})
    if rank != 0:
        return None
    files = {}
    for name in sorted(os.listdir(directory)):
        size = os.stat(directory / name).st_size
        theirs = [g[name] for g in gathered if name in g and g[name]["bytes"] == size]
        files[name] = theirs[0] if theirs else _digest(directory / name)
    return files


def manifest_text(step: int, files: dict[str, dict]) -> str:
    return json.dumps({"format": FORMAT, "step": step, "hash": "sha256",
                       "files": {n: files[n] for n in sorted(files)}}, indent=2) + "\n"


def _read_manifest(step: Path) -> tuple[dict[str, dict] | None, str | None]:
    """(files, None) or (None, why the manifest is unusable)."""
    try:
        m = json.loads((step / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{MANIFEST} cannot be read ({type(e).__name__}: {e})"
    files = m.get("files") if isinstance(m, dict) else None
    if (not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(files, dict)
            or not all(isinstance(d, dict) and isinstance(d.get("bytes"), int) and isinstance(d.get("sha256"), str)
                       for d in files.values())):
        return None, f"{MANIFEST} is not a {FORMAT} manifest"
    if any(n in (MANIFEST, "", ".", "..") or "/" in n or os.sep in n for n in files):
        return None, f"{MANIFEST} names a file outside the checkpoint directory"
    return files, None


def _file_problems(step: Path, files: dict[str, dict]) -> tuple[list[str], dict[str, int]]:
    """Missing, added, non-regular and resized files; the sizes of those left to hash."""
    problems, present = [], {}
    on_disk = {e.name: e for e in os.scandir(step)}
    for name in sorted(set(on_disk) - set(files) - {MANIFEST}):
        problems.append(f"file {name} is not in the manifest (added after the save)")
    for name in sorted(files):
        entry = on_disk.get(name)
        if entry is None:
            problems.append(f"file {name} is missing (the manifest lists it)")
        elif not entry.is_file(follow_symlinks=False):
            problems.append(f"{name} is not a regular file (a symlink or directory); a checkpoint holds only files")
        else:
            size = entry.stat(follow_symlinks=False).st_size
            if size != files[name]["bytes"]:
                problems.append(f"file {name} has {size} bytes, the manifest says {files[name]['bytes']} "
                                f"— truncated or changed")
            else:
                present[name] = size
    return problems, present


def verify(step: Path, *, trust_unverified: bool | None = None) -> dict[str, dict] | None:
    """Refuse ``step`` unless it is inside the trust boundary (see the module docstring).

    Collective under a process group: every rank checks, hashes a share of the files, and all raise
    the same ``ValueError`` (naming the checkpoint and every offending file) if any rank found a
    problem. Returns the manifest's files, or None for an unverified checkpoint loaded by opt-in.
    """
    rank, world = _world()
    problems = permission_problems(step)
    files, why = (None, None)
    if (step / MANIFEST).exists():
        files, why = _read_manifest(step)
    if why:
        problems.append(why)
    elif files is None:
        try:
            trust = trust_unverified_from_env() if trust_unverified is None else trust_unverified
        except ValueError as e:  # reported with the rest, on every rank
            problems.append(str(e))
            trust = True
        if trust and rank == 0 and not problems:
            warnings.warn(f"checkpoint {step} has no {MANIFEST}: loading it unverified, as asked "
                          f"(trust_unverified or {TRUST_ENV})", stacklevel=3)
        if not trust:
            problems.append(f"there is no {MANIFEST} (hashes of the files written at save), so nothing proves its "
                            f"files are the ones saved. Checkpoints written by older ringrt versions (before "
                            f"manifests) have none: if you wrote this one and nobody else could change it, load it with "
                            f"{TRUST_ENV}=1 (or load(..., trust_unverified=True)); the next save writes a manifest")
    if files is not None:
        found, present = _file_problems(step, files)
        problems += found
        for name in _shares(present, world)[rank]:
            try:
                if sha256_file(step / name) != files[name]["sha256"]:
                    problems.append(f"file {name} does not match its SHA-256 in the manifest — changed after the save")
            except OSError as e:
                problems.append(f"file {name} cannot be read ({e})")
    everyone = list(dict.fromkeys(p for part in _all_gather(problems) for p in part))
    if everyone:
        others = sorted(c.name for c in step.parent.glob("step_*") if c != step)
        raise ValueError(
            f"checkpoint {step.name} ({step}) is refused before anything in it was unpickled (loading a checkpoint "
            f"runs code it contains, so it must be one you or root own, nobody else can write, unchanged since "
            f"it was saved):\n  - " + "\n  - ".join(everyone) +
            f"\nA checkpoint that fails verification is not skipped in favour of an older one; to resume from an "
            f"older one, move this one aside (other checkpoints here: {others})")
    return files
