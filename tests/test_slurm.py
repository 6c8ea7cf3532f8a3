"""A real Slurm cluster on this machine (munged, slurmctld, two emulated slurmd nodes), our sbatch
templates submitted with ``sbatch --wait``: one task per node running torchrun, one task per rank,
srun --mpi=pmix with mpi4py, a failing job, and a Hydra sweep through ``submitit_slurm``. The jobs run concurrently; each test checks one."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import slurm_local
from tests.launch_util import REPO, check_probe, free_port

pytestmark = pytest.mark.skipif(not slurm_local.available(), reason="Slurm not installed (apt: slurm-wlm munge)")

JOBS = {
    # name: (template, sbatch options, probe options, environment)
    "torchrun": ("torchrun.sbatch", ["--nodes=2"], [], "RDZV_PORT"),
    "per_rank": ("per_rank.sbatch", ["--nodes=2", "--ntasks-per-node=1"], [], "MASTER_PORT"),
    "pmix": ("mpi.sbatch", ["--nodes=1", "--ntasks=2"], [], None),
    "bad": ("per_rank.sbatch", ["--nodes=2", "--ntasks-per-node=1"], ["--seq-len", "30"], "MASTER_PORT"),
}


@pytest.fixture(scope="module")
def jobs():
    """Start the cluster, submit every job, yield {name: wait() -> (exit code, log text, result path)}."""
    # Not under pytest's tmp dir: that is mode 0700 and munged runs as the munge user.
    root = Path(tempfile.mkdtemp(prefix="ringrt-slurm-"))
    cluster = slurm_local.LocalSlurm(root)
    procs = {}
    try:
        cluster.start()
        for name, (template, opts, probe_opts, port_var) in JOBS.items():
            env = {port_var: str(free_port())} if port_var else {}
            out, log = root / f"{name}.json", root / f"{name}.out"
            procs[name] = (cluster.sbatch_wait(
                [*opts, f"--job-name={name}", f"--output={log}", f"--chdir={REPO}", str(REPO / "slurm" / template),
                 "-m", "ringrt.jobs.probe", "--out", str(out), *probe_opts], extra_env=env), out, log)

        sweep = root / "sweep"
        procs["submitit"] = (subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "probe.py"), "-m", "hydra/launcher=submitit_slurm",
             "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1", "hydra.launcher.partition=debug",
             "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1", "probe.seed=0,1",
             f"hydra.sweep.dir={sweep}"], cwd=root, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True), sweep, root / "sweep.log")

        def wait(name: str, timeout: float = 150):
            proc, out, log = procs[name]
            code = proc.wait(timeout=timeout)
            return code, (log.read_text() if log.exists() else proc.stdout.read() + proc.stderr.read()), out

        yield wait
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(200)
def test_torchrun_per_node(jobs):
    code, log, out = jobs("torchrun")
    assert code == 0, log[-4000:]
    assert "nodes=2 nproc_per_node=1" in log
    result = check_probe(out, world=2, launcher="torchrun")
    assert len({r["pid"] for r in result["ranks"]}) == 2


@pytest.mark.timeout(200)
def test_task_per_rank(jobs):
    code, log, out = jobs("per_rank")
    assert code == 0, log[-4000:]
    assert "master=127.0.0.1:" in log  # node name n1 resolved to an IP through Slurm's NodeAddr
    check_probe(out, world=2, launcher="slurm")


@pytest.mark.timeout(200)
def test_srun_pmix_mpi4py(jobs):
    assert importlib.util.find_spec("mpi4py") is not None, "mpi4py missing: pip install 'ringrt[mpi]'"
    code, log, out = jobs("pmix")
    assert code == 0, log[-4000:]
    check_probe(out, world=2, launcher="mpi")


@pytest.mark.timeout(200)
def test_failed_job_fails_sbatch_wait(jobs):
    """sbatch --wait returns the job's exit code: a rank that rejects its input fails the job."""
    code, log, out = jobs("bad")
    assert code != 0
    assert "probe.seq_len=30 must be a multiple of 2 x world size = 4" in log
    assert not out.exists()


@pytest.mark.timeout(200)
def test_hydra_submitit_slurm_sweep(jobs):
    """python launch/probe.py -m hydra/launcher=submitit_slurm: each sweep job is a 2-node Slurm job
    whose tasks are the ranks (read from SLURM_PROCID/SLURM_NTASKS)."""
    code, log, sweep = jobs("submitit")
    assert code == 0, log[-4000:]
    for job in (0, 1):
        result = check_probe(sweep / str(job) / "probe.json", world=2, launcher="slurm")
        assert result["config"]["seed"] == job
        assert (sweep / str(job) / ".hydra" / "config.yaml").is_file()
