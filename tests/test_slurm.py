"""A real Slurm cluster on this machine (munged, slurmctld, two emulated slurmd nodes), our sbatch
templates submitted with ``sbatch --wait``: one task per node running torchrun, one task per rank,
and srun --mpi=pmix with mpi4py."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile

import pytest

from tests import slurm_local
from tests.launch_util import REPO, check_probe, free_port

pytestmark = pytest.mark.skipif(not slurm_local.available(), reason="Slurm not installed (apt: slurm-wlm munge)")


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp dir: that is mode 0700 and munged runs as the munge user.
    root = tempfile.mkdtemp(prefix="ringrt-slurm-")
    c = slurm_local.LocalSlurm(root).start()
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


def _submit(cluster, tmp_path, template, *sbatch_args, probe_args=(), env=None):
    out, log = tmp_path / "probe.json", tmp_path / "job.out"
    p = cluster.sbatch_wait([*sbatch_args, f"--output={log}", f"--chdir={REPO}", str(REPO / "slurm" / template),
                             "-m", "ringrt.probe", "--out", str(out), *probe_args], extra_env=env)
    return p, out, log.read_text() if log.exists() else ""


@pytest.mark.timeout(120)
def test_torchrun_per_node(cluster, tmp_path):
    p, out, log = _submit(cluster, tmp_path, "torchrun.sbatch", "--nodes=2", env={"RDZV_PORT": str(free_port())})
    assert p.returncode == 0, log[-4000:]
    assert "nodes=2 nproc_per_node=1" in log
    result = check_probe(out, world=2, launcher="torchrun")
    assert len({r["pid"] for r in result["ranks"]}) == 2


@pytest.mark.timeout(120)
def test_task_per_rank(cluster, tmp_path):
    p, out, log = _submit(cluster, tmp_path, "per_rank.sbatch", "--nodes=2", "--ntasks-per-node=1",
                          env={"MASTER_PORT": str(free_port())})
    assert p.returncode == 0, log[-4000:]
    assert "master=127.0.0.1:" in log  # the node name n1 resolved to an IP through Slurm's NodeAddr
    check_probe(out, world=2, launcher="slurm")


@pytest.mark.timeout(120)
def test_srun_pmix_mpi4py(cluster, tmp_path):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.fail("mpi4py missing: pip install 'ringrt[mpi]'")
    p, out, log = _submit(cluster, tmp_path, "mpi.sbatch", "--nodes=1", "--ntasks=2")
    assert p.returncode == 0, log[-4000:]
    check_probe(out, world=2, launcher="mpi")


@pytest.mark.timeout(120)
def test_failed_job_fails_sbatch_wait(cluster, tmp_path):
    """sbatch --wait returns the job's exit code: a rank that rejects its input fails the job."""
    p, out, log = _submit(cluster, tmp_path, "per_rank.sbatch", "--nodes=2", "--ntasks-per-node=1",
                          probe_args=("--seq-len", "30"), env={"MASTER_PORT": str(free_port())})
    assert p.returncode != 0
    assert "probe.seq_len=30 must be a multiple of 2 x world size = 4" in log
    assert not out.exists()
