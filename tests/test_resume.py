"""Checkpoint/resume through the real launch path (torchrun + launch/train.py, 2 ranks):

* an uninterrupted run and a run whose rank 1 is killed with SIGKILL mid-run under
  ``torchrun --max-restarts=1`` (which restarts all ranks; they resume from the newest complete
  checkpoint in the same run directory) log bit-identical losses for every step;
* checkpoints are saved every step, so the kill usually lands in or next to a save: every
  checkpoint left complete on disk must load, and an unfinished one must not count.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launch_util import REPO, run

TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
STEPS = 10
ARGS = ["data.seq_len=64", "data.batch_size=2", "train.warmup_steps=3", f"train.steps={STEPS}", "train.log_every=1",
        "train.ckpt_every=1", "train.keep_last=3", "logging.wandb=disabled", "train.progress=false"]


def _cmd(run_dir: Path, restarts: int) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}",
            str(REPO / "launch" / "train.py"), *ARGS, f"hydra.run.dir={run_dir}"]


def _losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it (a step redone after a restart appears twice)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def _worker_with_rank(agent: psutil.Process, rank: int) -> psutil.Process | None:
    for child in agent.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.timeout(280)
def test_kill_one_rank_restart_resumes_bit_identical(tmp_path):
    ref = run(_cmd(tmp_path / "ref", 0), timeout=120)
    assert ref.returncode == 0, ref.stderr[-4000:]
    want = _losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "killed"
    agent = subprocess.Popen(_cmd(run_dir, 1), cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ckpts, deadline, victim = run_dir / "checkpoints", time.monotonic() + 120, None
        while victim is None:  # kill rank 1 once a few checkpoints exist, i.e. mid-run
            assert agent.poll() is None and time.monotonic() < deadline, "run ended before the kill"
            if ckpts.is_dir() and any(p.name >= "step_00000004" for p in ckpts.glob("step_*")):
                victim = _worker_with_rank(psutil.Process(agent.pid), 1)
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        out, err = agent.communicate(timeout=150)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, err[-4000:]
    got = _losses(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and 4 <= resumed[0]["step"] < STEPS, resumed  # restarted once, mid-run
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, losses in got.items():  # before and after the restart, bit for bit
        assert all(loss == want[step][0] for loss in losses), (step, losses, want[step])

    import torch

    from ringrt.run import checkpoint
    from ringrt.model.config import ModelConfig
    from ringrt.model.llama import Llama

    complete = checkpoint.complete(run_dir / "checkpoints")
    assert complete and complete[-1].name == f"step_{STEPS:08d}"
    model = Llama(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    for c in complete:  # everything that looks complete loads
        meta = checkpoint.load(c, model=model)
        assert meta["step"] == int(c.name.split("_")[1])
        assert all(torch.isfinite(p).all() for p in model.parameters())


_KILLED_DURING_SAVE = r"""
import os, sys, torch
import torch.distributed.checkpoint as dcp
from ringrt.run import checkpoint
torch.manual_seed(0)
model = torch.nn.Linear(8, 8)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 8)).sum().backward(); opt.step()
root = sys.argv[1]
checkpoint.save(root, 1, model=model, optimizer=opt, meta={"data_position": 1})
torch.save(model.state_dict(), os.path.join(root, "expected.pt"))
real_save = dcp.save
def dying_save(state, checkpoint_id):  # the data files are written, then the process is killed
    real_save(state, checkpoint_id=checkpoint_id)
    os.kill(os.getpid(), 9)
dcp.save = dying_save
with torch.no_grad():
    model.weight.add_(1.0)
checkpoint.save(root, 2, model=model, optimizer=opt, meta={"data_position": 2})
"""


@pytest.mark.timeout(60)
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    import torch

    from ringrt.run import checkpoint

    root = tmp_path / "ckpt"
    p = run([sys.executable, "-c", _KILLED_DURING_SAVE, str(root)], timeout=50)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert [c.name for c in checkpoint.complete(root)] == ["step_00000001"]
    assert any(d.name.startswith(".step_00000002") for d in root.iterdir())  # the unfinished save is there...
    assert checkpoint.latest(root).name == "step_00000001"  # ...and ignored
    model = torch.nn.Linear(8, 8)
    meta = checkpoint.load(checkpoint.latest(root), model=model)
    assert meta["step"] == 1 and meta["data_position"] == 1
    expected = torch.load(root / "expected.pt")
    assert torch.equal(model.weight, expected["weight"]) and torch.equal(model.bias, expected["bias"])
