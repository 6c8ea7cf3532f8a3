"""Extensible Tokenization's embedder training resumes bit-identically after ``kill -9``.

Through the real command (``python -m ringrt train --compression.enabled true ...``, one process):

* an uninterrupted run and a run killed with SIGKILL once a few checkpoints exist, then rerun with the
  same command (it resumes from the newest complete checkpoint in the same out_dir), log bit-identical
  losses for every step, and end with bit-identical embedders;
* the rerun logs ``resumed_from`` once, at a step mid-run.

The killed run sleeps briefly after each checkpoint (a wrapper around ``ringrt.run.checkpoint.save`` in the
child process only) so that the kill lands mid-run on any machine; what is written is unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch_util import REPO, run

STEPS = 8
KILL_AFTER = 3  # kill once step_00000003 is complete

_CHILD = r"""
import sys, time
import ringrt.run.checkpoint as checkpoint
from ringrt.cli import main

if sys.argv[1] == "slow":  # leave time to kill between checkpoints
    real_save = checkpoint.save
    def save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        time.sleep(0.5)
        return path
    checkpoint.save = save
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _cmd(llm: Path, out: Path, slow: bool) -> list[str]:
    return [sys.executable, "-c", _CHILD, "slow" if slow else "plain", "--compression.enabled", "true",
            "--compression.chunk_len", "16", "--compression.train_chunks", "3", "--compression.ks", "2", "4",
            "--compression.embedder_layers", "1", "--data.batch_size", "2", "--train.init_from", str(llm),
            "--train.out_dir", str(out), "--train.steps", str(STEPS), "--train.warmup_steps", "2",
            "--train.log_every", "1", "--train.ckpt_every", "1", "--train.keep_last", "2", "--train.progress", "false"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it (a step redone after the kill appears twice)."""
    got: dict[int, list[float]] = {}
    for row in _rows(out):
        if "loss" in row:
            got.setdefault(row["step"], []).append(row["loss"])
    return got


@pytest.mark.timeout(120)
def test_kill_and_rerun_resumes_bit_identical(tmp_path):
    from ringrt.run import checkpoint
    from ringrt.model.config import ModelConfig
    from ringrt.model.hf import save_pretrained
    from ringrt.model.llama import Llama

    torch.manual_seed(0)
    llm = tmp_path / "llm"
    save_pretrained(Llama(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)), llm, extra={"train_len": 64})

    ref = run(_cmd(llm, tmp_path / "ref", slow=False), timeout=60)
    assert ref.returncode == 0, ref.stderr[-4000:]
    want = _losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in want.values())

    out = tmp_path / "killed"
    ckpts = out / "embedder_checkpoints"
    child = subprocess.Popen(_cmd(llm, out, slow=True), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while checkpoint.latest(ckpts) is None or checkpoint.latest(ckpts).name < f"step_{KILL_AFTER:08d}":
            assert child.poll() is None, f"the run ended before the kill:\n{child.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    done = checkpoint.latest(ckpts)
    assert done is not None and done.name < f"step_{STEPS:08d}", done  # killed mid-run

    again = run(_cmd(llm, out, slow=False), timeout=60)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = [r for r in _rows(out) if "resumed_from" in r]
    assert len(resumed) == 1 and KILL_AFTER <= resumed[0]["step"] < STEPS, resumed
    got = _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, losses in got.items():  # before and after the kill, bit for bit
        assert all(loss == want[step][0] for loss in losses), (step, losses, want[step])

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "embedder" / "embedder.safetensors"))
    b = load_file(str(out / "embedder" / "embedder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c.name for c in checkpoint.complete(ckpts)] == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]  # keep_last
