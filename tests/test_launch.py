"""Launcher facts (env parsing) and real torchrun launches of the probe job."""

from __future__ import annotations

import shutil

import pytest

from ringrt.distributed.launcher import LaunchConfig, detect, run_id
from tests.launch_util import PYTHON, REPO, check_probe, free_port, run

TORCHRUN = shutil.which("torchrun")


def test_detect_each_launcher():
    tr = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (tr.source, tr.rank, tr.world_size, tr.local_rank, tr.local_world_size) == ("torchrun", 3, 8, 1, 4)
    assert (tr.master_addr, tr.master_port) == ("10.0.0.1", 29500)  # torchrun wins inside a Slurm job
    sl = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "77"})
    assert (sl.source, sl.rank, sl.world_size, sl.local_rank, sl.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert sl.master_addr == "127.0.0.1" and sl.master_port == 20077
    mpi = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "3"})
    assert (mpi.source, mpi.rank, mpi.world_size, mpi.local_rank, mpi.master_addr) == ("mpi", 2, 3, 2, None)
    pmix = detect({"PMIX_RANK": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert (pmix.source, pmix.rank, pmix.world_size, pmix.local_rank) == ("mpi", 1, 2, 1)
    sub = detect({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
                  "SUBMITIT_LOCAL_JOB_ID": "4242"})
    assert (sub.source, sub.rank, sub.world_size, sub.master_addr, sub.master_port) == ("submitit", 1, 2, "127.0.0.1", 24242)
    assert detect({}).source == "single" and detect({}).world_size == 1


def test_bad_environment_and_config_are_named():
    with pytest.raises(ValueError, match=r"RANK='x' must be an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"launcher.backend='mpi' is not valid; valid: auto, gloo, nccl"):
        LaunchConfig(backend="mpi")
    with pytest.raises(ValueError, match=r"launcher.timeout_s=0"):
        LaunchConfig(timeout_s=0)


def test_run_id_is_shared_per_launch():
    assert run_id({"TORCHELASTIC_RUN_ID": "abc/1", "SLURM_JOB_ID": "9"}) == "abc_1"
    assert run_id({"SLURM_JOB_ID": "9"}) == "9"
    assert run_id({}) is None


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.timeout(120)
def test_torchrun_standalone_through_run_sh(tmp_path):
    out = tmp_path / "probe.json"
    p = run([str(REPO / "launch" / "run.sh"), "-m", "ringrt.jobs.probe", "--seq-len", "48", "--out", str(out)],
            env={"NPROC_PER_NODE": "3"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert '"ok": true' in p.stdout
    check_probe(out, world=3, launcher="torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.timeout(120)
def test_torchrun_c10d_two_agents(tmp_path):
    """Two torchrun agents ("nodes") meet through a c10d rendezvous, one worker each."""
    import subprocess

    out = tmp_path / "probe.json"
    port = free_port()
    cmd = [TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id=t{port}", "-m", "ringrt.jobs.probe", "--out", str(out)]
    second = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = run(cmd, timeout=90)
        assert second.wait(timeout=30) == 0, second.stderr.read()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
    assert first.returncode == 0, first.stderr[-3000:]
    check_probe(out, world=2, launcher="torchrun")


@pytest.mark.timeout(60)
def test_probe_failure_is_an_exit_code(tmp_path):
    """A bad setting fails the launch with a message naming it (and no result file)."""
    out = tmp_path / "probe.json"
    p = run([PYTHON, "-m", "ringrt.jobs.probe", "--heads", "3", "--kv-heads", "2", "--out", str(out)])
    assert p.returncode != 0
    assert "probe.heads=3 must be a multiple of probe.kv_heads=2" in p.stderr
    assert not out.exists()
