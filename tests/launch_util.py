"""Helpers for launch tests: free ports, running a launcher command with a timeout, reading results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, timeout: float = 120, env: dict | None = None, cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """Run a launcher command; on timeout the whole process group is killed (no stray ranks)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def check_probe(path: Path, *, world: int, launcher: str) -> dict:
    """The probe's JSON: every rank within tolerance, the expected world size and launcher."""
    result = json.loads(Path(path).read_text())
    assert result["world_size"] == world, result
    assert result["launcher"] == launcher, result
    assert sorted(r["rank"] for r in result["ranks"]) == list(range(world))
    for r in result["ranks"]:
        for name, err in r["max_abs_err"].items():
            assert err <= r["tolerance"][name], (r["rank"], name, err, r["tolerance"][name])
    assert result["ok"] is True
    return result


PYTHON = sys.executable
