"""Ctrl-C of a distributed training: every rank stops with one line naming where it stopped and the
command that resumes it, exit code 130, no tracebacks; that command continues from the checkpoint.

The interrupt is sent like a terminal's Ctrl-C: SIGINT to the launcher's process group (torchrun
starts its workers in sessions of their own and forwards the signal to them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.launch_util import REPO

RUN_SH = str(REPO / "launch" / "run.sh")
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
TINY = ["data.seq_len=64", "data.batch_size=2", "train.warmup_steps=2", "train.steps=30", "train.log_every=1",
        "train.ckpt_every=2", "train.keep_last=2", "logging.wandb=disabled", "train.progress=false"]
ONE_LINE = re.compile(r"^rank (\d)/2: training interrupted after step (\d+); last checkpoint step (\d+) in (\S+); "
                      r"resume with: (.+)$")


class Launch:
    """A launch in its own session; its output lines, each with the time it arrived."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict | None = None):
        self.p = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._readers = [threading.Thread(target=self._read, args=(f,), daemon=True) for f in (self.p.stdout, self.p.stderr)]
        for t in self._readers:
            t.start()

    def _read(self, f) -> None:
        for line in f:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{what} never happened (exit {self.p.returncode}):\n" + self.text())
            time.sleep(0.05)

    def ctrl_c(self) -> float:
        t = time.monotonic()
        os.killpg(self.p.pid, signal.SIGINT)
        return t

    def finish(self, timeout: float) -> int:
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout} s after Ctrl-C:\n" + self.text()) from None
        for t in self._readers:
            t.join(timeout=5)
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()

    def text(self, since: float = 0.0) -> str:
        return "\n".join(line for t, line in self.lines if t >= since)


def _checkpoint_steps(run_dirs: list[Path]) -> list[int]:
    return sorted(int(p.name[5:]) for d in run_dirs for p in (d / "checkpoints").glob("step_*"))


@pytest.mark.timeout(240)
def test_ctrl_c_of_a_two_rank_training_stops_with_one_line_per_rank_and_resumes(tmp_path):
    launch = Launch([RUN_SH, str(REPO / "launch" / "train.py"), *TINY], cwd=tmp_path, env={"NPROC_PER_NODE": "2"})
    try:
        launch.wait_for(lambda: any(s >= 4 for s in _checkpoint_steps(list((tmp_path / "outputs").glob("run-*")))),
                        timeout=150, what="a checkpoint at step >= 4")
        sent = launch.ctrl_c()
        code = launch.finish(timeout=60)
    finally:
        launch.kill()
    after = launch.text(since=sent)
    assert code == 130, launch.text()
    assert "Traceback" not in launch.text(), launch.text()
    assert len(after.splitlines()) <= 4, after  # one line per rank (+ a step line already on its way)
    ones = [m for m in map(ONE_LINE.match, after.splitlines()) if m]
    assert sorted(int(m.group(1)) for m in ones) == [0, 1], after
    (run_dir,) = (tmp_path / "outputs").glob("run-*")
    for m in ones:
        assert int(m.group(3)) >= 4 and int(m.group(2)) >= int(m.group(3)), m.group(0)
        assert Path(m.group(4)) == run_dir / "checkpoints"
        assert m.group(5).startswith(f"NPROC_PER_NODE=2 {RUN_SH} {REPO / 'launch' / 'train.py'} ")
        assert m.group(5).endswith(f" hydra.run.dir={run_dir}")
    stopped_at = int(ones[0].group(3))
    assert not list((run_dir / "checkpoints").glob(f"step_{stopped_at + 1:08d}*"))  # nothing newer, no half save

    # The printed command is the next one to run: it continues from that checkpoint to the end.
    again = subprocess.run(["bash", "-c", ones[0].group(5)], cwd=tmp_path, capture_output=True, text=True, timeout=150,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["step"] == stopped_at, resumed
    assert resumed[0]["resumed_from"] == str(run_dir / "checkpoints" / f"step_{stopped_at:08d}")
    assert [r["step"] for r in rows if "loss" in r][-1] == 30
    assert list((tmp_path / "outputs").glob("run-*")) == [run_dir]
    # A plain re-run of the same command uses the same run dir (it resumes: here, nothing left to do).
    plain = subprocess.run([RUN_SH, str(REPO / "launch" / "train.py"), *TINY], cwd=tmp_path, capture_output=True,
                           text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"})
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert list((tmp_path / "outputs").glob("run-*")) == [run_dir]
    assert "resumed_from" in (run_dir / "metrics.jsonl").read_text().splitlines()[-1]


@pytest.mark.timeout(180)
def test_ctrl_c_of_ringrt_train_under_torchrun_names_the_out_dir(tmp_path):
    """``-m ringrt train`` (flags, not Hydra): the same one line per rank, resume adds --train.out_dir."""
    flags = ["--data.seq_len", "64", "--data.batch_size", "2", "--model.dim", "64", "--model.n_layers", "2",
             "--train.steps", "200", "--train.ckpt_every", "1", "--train.log_every", "1", "--train.progress", "false"]
    launch = Launch([RUN_SH, "-m", "ringrt", "train", *flags], cwd=tmp_path, env={"NPROC_PER_NODE": "2"})
    try:
        launch.wait_for(lambda: bool(_checkpoint_steps([tmp_path / "outputs" / "train"])), timeout=120,
                        what="a checkpoint")
        sent = launch.ctrl_c()
        code = launch.finish(timeout=60)
    finally:
        launch.kill()
    after = launch.text(since=sent).splitlines()
    assert code == 130 and "Traceback" not in launch.text(), launch.text()
    ones = [line for line in after if line.startswith(("rank 0/2: training interrupted", "rank 1/2: training interrupted"))]
    assert len(ones) == 2 and len(after) <= 4, after
    for line in ones:
        assert line.endswith(f"resume with: NPROC_PER_NODE=2 {RUN_SH} -m ringrt train {' '.join(flags)} "
                             f"--train.out_dir {tmp_path / 'outputs' / 'train'}"), line
    # The checkpoint the line names is complete and loads.
    from ringrt.run import checkpoint
    from ringrt.model.config import ModelConfig
    from ringrt.model.llama import Llama

    named = int(re.search(r"last checkpoint step (\d+) in ", ones[0]).group(1))
    latest = checkpoint.latest(tmp_path / "outputs" / "train" / "checkpoints")
    assert latest.name == f"step_{named:08d}"
    assert checkpoint.load(latest, model=Llama(ModelConfig(dim=64, n_layers=2)))["step"] == named


_DEFERRED = r"""
import os, signal, sys, time
from ringrt.jobs import interrupt
with interrupt.stops_cleanly("test job"):
    interrupt.note(step=3)
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("save finished", flush=True)
    print("not reached", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_signal_during_a_deferred_block_is_delivered_when_it_ends():
    p = subprocess.run([sys.executable, "-c", _DEFERRED], capture_output=True, text=True, timeout=50)
    assert p.returncode == 130, p.stderr
    assert p.stdout == "save finished\n"
    assert p.stderr == "rank 0/1: test job interrupted after step 3\n"
