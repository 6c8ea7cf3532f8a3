"""Checkpoints are code (DCP unpickles them): what ``checkpoint.load`` refuses, and that a normal
save/load still restores model, optimizer and RNG bit for bit.

Each refusal is checked before anything is unpickled: a crafted file whose unpickling would create
a marker file leaves no marker. Single process (DCP needs no process group) plus one 2-rank gloo
spawn for the manifest written once and verified on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shlex
import stat
from pathlib import Path

import pytest
import torch

from ringrt.run import checkpoint
from tests.distributed import run

pytestmark = pytest.mark.timeout(60)
MANIFEST, TRUST_ENV = "manifest.json", "RINGRT_TRUST_UNVERIFIED_CHECKPOINTS"


class _RunsCode:
    """Unpickling this runs ``touch marker`` (what an attacker's checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(3, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    return _trained(seed=123)


def _saved(tmp_path: Path, step: int = 20) -> Path:
    model, opt = _trained()
    return checkpoint.save(tmp_path / "ckpt", step, model=model, optimizer=opt, meta={"data_position": step})


def _draws() -> tuple[torch.Tensor, list[float]]:
    return torch.rand(5), [random.random() for _ in range(5)]


def test_round_trip_bit_identical_with_manifest(tmp_path):
    model, opt = _trained()
    random.seed(7)
    random.gauss(0.0, 1.0)  # leaves a cached gauss_next (a float) in Python's RNG state
    p = checkpoint.save(tmp_path / "ckpt", 20, model=model, optimizer=opt, meta={"data_position": 20})
    want_t, want_py = _draws()  # what the uninterrupted run draws next
    want_gauss = random.gauss(0.0, 1.0)

    torch.manual_seed(999)
    random.seed(999)
    model2, opt2 = _fresh()
    meta = checkpoint.load(p, model=model2, optimizer=opt2)
    got_t, got_py = _draws()
    assert meta == {"step": 20, "data_position": 20}
    assert torch.equal(got_t, want_t) and got_py == want_py and random.gauss(0.0, 1.0) == want_gauss
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), (k, name)

    manifest = json.loads((p / MANIFEST).read_text())
    on_disk = sorted(os.listdir(p))
    assert sorted(manifest["files"]) == [n for n in on_disk if n != MANIFEST]
    assert {".metadata", "__0_0.distcp", "rng_0.pt", "meta.json"} <= set(manifest["files"])
    for name, d in manifest["files"].items():
        assert d["bytes"] == (p / name).stat().st_size
        assert d["sha256"] == hashlib.sha256((p / name).read_bytes()).hexdigest()


def test_crafted_rng_file_is_refused_and_never_unpickled(tmp_path):
    p = _saved(tmp_path)
    marker = tmp_path / "pwned_rng"
    torch.save({"torch": torch.get_rng_state(), "python": _RunsCode(marker)}, p / "rng_0.pt")
    model, opt = _fresh()
    with pytest.raises(ValueError, match=r"(?s)step_00000020.*\n.*file rng_0\.pt (has \d+ bytes|does not match)"):
        checkpoint.load(p, model=model, optimizer=opt)
    assert not marker.exists()

    # Even where the manifest is bypassed (an old checkpoint loaded by opt-in), the RNG file loads
    # weights_only: the payload is refused by the unpickler, not run.
    (p / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="unverified"), \
            pytest.raises(ValueError, match=r"step_00000020.*rng_0\.pt is not an RNG state.*Weights only load failed"):
        checkpoint.load(p, model=model, optimizer=opt, trust_unverified=True)
    assert not marker.exists()


def test_crafted_metadata_is_refused_before_unpickling(tmp_path):
    p = _saved(tmp_path)
    marker = tmp_path / "pwned_metadata"
    (p / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    model, opt = _fresh()
    with pytest.raises(ValueError, match=r"(?s)checkpoint step_00000020 .* before anything in it was unpickled"
                                         r".*file \.metadata (has \d+ bytes|does not match)"):
        checkpoint.load(p, model=model, optimizer=opt)
    assert not marker.exists()


def test_changed_added_and_missing_files_are_named(tmp_path):
    p = _saved(tmp_path)
    model, opt = _fresh()
    shard = p / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    shard.write_bytes(bytes(data))
    (p / "extra.pt").write_bytes(b"x")
    (p / "rng_0.pt").unlink()
    with pytest.raises(ValueError) as e:
        checkpoint.load(p, model=model, optimizer=opt)
    msg = str(e.value)
    assert "file __0_0.distcp does not match its SHA-256 in the manifest" in msg
    assert "file extra.pt is not in the manifest" in msg
    assert "file rng_0.pt is missing" in msg
    assert "not skipped in favour of an older one" in msg


def test_truncated_shard_names_step_and_file(tmp_path):
    p = _saved(tmp_path)
    shard = p / "__0_0.distcp"
    full = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(full // 2)
    model, opt = _fresh()
    with pytest.raises(ValueError, match=rf"(?s)checkpoint step_00000020 .*file __0_0\.distcp has {full // 2} bytes, "
                                         rf"the manifest says {full} — truncated or changed"):
        checkpoint.load(p, model=model, optimizer=opt)

    # Without a manifest (opted in) the DCP error itself is wrapped with the checkpoint it came from.
    (p / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="unverified"), \
            pytest.raises(RuntimeError, match=rf"checkpoint step_00000020 \({re.escape(str(p))}\): restoring the model and optimizer failed"):
        checkpoint.load(p, model=model, optimizer=opt, trust_unverified=True)


def test_missing_manifest_refused_unless_opted_in(tmp_path, monkeypatch):
    p = _saved(tmp_path)
    (p / MANIFEST).unlink()  # what a checkpoint of an older ringrt looks like
    model, opt = _fresh()
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(ValueError, match=r"(?s)step_00000020.*no manifest\.json.*older.*"
                                         r"RINGRT_TRUST_UNVERIFIED_CHECKPOINTS=1"):
        checkpoint.load(p, model=model, optimizer=opt)
    monkeypatch.setenv(TRUST_ENV, "maybe")
    with pytest.raises(ValueError, match=r"RINGRT_TRUST_UNVERIFIED_CHECKPOINTS='maybe' is not valid"):
        checkpoint.load(p, model=model, optimizer=opt)
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.warns(UserWarning, match="unverified"):
        assert checkpoint.load(p, model=model, optimizer=opt)["step"] == 20
    monkeypatch.delenv(TRUST_ENV)
    with pytest.warns(UserWarning, match="unverified"):
        assert checkpoint.load(p, model=model, optimizer=opt, trust_unverified=True)["step"] == 20
    ref, _ = _trained()
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters(), strict=True))


def test_writable_by_others_or_foreign_owner_refused(tmp_path, monkeypatch):
    p = _saved(tmp_path)
    model, opt = _fresh()
    for target, bits in ((p, stat.S_IWGRP), (p / "__0_0.distcp", stat.S_IWOTH), (p.parent, stat.S_IWGRP)):
        mode = stat.S_IMODE(target.stat().st_mode)
        os.chmod(target, mode | bits)
        with pytest.raises(ValueError, match=rf"(?s){re.escape(str(target))} is writable by group/others \(mode [-drwx]+ \(\d+\), owner "
                                             rf"[^)]+\).*fix: chmod go-w {re.escape(str(target))}"):
            checkpoint.load(p, model=model, optimizer=opt)
        os.chmod(target, mode)

    shard = p / "__0_0.distcp"
    if os.geteuid() == 0:  # root: hand the file to another user
        os.chown(shard, 4242, -1)
    else:  # otherwise: be another user (the files stay owned by the real one, who is not root)
        from ringrt.run import checkpoint_trust

        monkeypatch.setattr(checkpoint_trust, "_euid", lambda: os.geteuid() + 1)
    with pytest.raises(ValueError, match=rf"(?s){re.escape(str(shard))} is owned by .*, not by you .* or root.*cp -r"):
        checkpoint.load(p, model=model, optimizer=opt)
    monkeypatch.undo()
    if os.geteuid() == 0:
        os.chown(shard, 0, -1)
    assert checkpoint.load(p, model=model, optimizer=opt)["step"] == 20


def test_save_under_loose_umask_is_loadable(tmp_path):
    old = os.umask(0o002)  # group-writable files, as on systems with per-user groups
    try:
        p = _saved(tmp_path)
    finally:
        os.umask(old)
    for f in [p.parent, p, *p.iterdir()]:
        assert not f.stat().st_mode & 0o022, f
    model, opt = _fresh()
    assert checkpoint.load(p, model=model, optimizer=opt)["step"] == 20


def test_keep_last_never_deletes_the_new_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    model, opt = _trained()
    checkpoint.save(root, 30, model=model, optimizer=opt, meta={}, keep_last=1)  # an abandoned run's
    checkpoint.save(root, 10, model=model, optimizer=opt, meta={}, keep_last=1)  # a new run, earlier step
    assert [c.name for c in checkpoint.complete(root)] == ["step_00000010", "step_00000030"]
    checkpoint.save(root, 11, model=model, optimizer=opt, meta={}, keep_last=2)
    checkpoint.save(root, 12, model=model, optimizer=opt, meta={}, keep_last=2)
    assert [c.name for c in checkpoint.complete(root)] == ["step_00000011", "step_00000012", "step_00000030"]


def _two_ranks(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    torch.manual_seed(100 + rank)  # a different RNG state on each rank
    random.seed(100 + rank)
    p = checkpoint.save(root, 5, model=model, optimizer=opt, meta={"data_position": 5})
    want = _draws()
    out: dict = {"manifest": sorted(json.loads((p / MANIFEST).read_text())["files"])}
    fresh = torch.nn.Linear(8, 8)
    checkpoint.load(p, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
    got = _draws()
    out["rng_restored"] = torch.equal(got[0], want[0]) and got[1] == want[1]
    out["weights_restored"] = torch.equal(fresh.weight, model.weight)
    dist.barrier()
    if rank == 1:  # a file of the other rank changed: every rank must refuse, nobody may hang in DCP
        with open(p / "rng_0.pt", "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
    dist.barrier()
    try:
        checkpoint.load(p, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


@pytest.mark.timeout(120)
def test_two_ranks_manifest_written_once_and_verified_on_every_rank(tmp_path):
    root = tmp_path / "ckpt"
    r0, r1 = run(_two_ranks, 2, str(root), timeout=100)
    names = sorted(os.listdir(root / "step_00000005"))
    assert names.count(MANIFEST) == 1 and not [n for n in os.listdir(root) if n.startswith(".")]
    for r in (r0, r1):
        assert r["manifest"] == [n for n in names if n != MANIFEST]
        assert {"rng_0.pt", "rng_1.pt", ".metadata", "meta.json"} <= set(r["manifest"])
        assert r["rng_restored"] and r["weights_restored"]
        assert r["error"] is not None and "file rng_0.pt does not match its SHA-256" in r["error"]
    assert r0["error"] == r1["error"]

