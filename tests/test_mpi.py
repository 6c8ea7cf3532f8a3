"""mpirun (OpenMPI) launch: ranks discovered through mpi4py, rendezvous address broadcast by rank 0."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from tests.launch_util import PYTHON, check_probe, run

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (apt: openmpi-bin libopenmpi-dev)")


@pytest.mark.timeout(120)
def test_mpirun_three_ranks(tmp_path):
    assert importlib.util.find_spec("mpi4py") is not None, "mpi4py missing: pip install 'ringrt[mpi]'"
    out = tmp_path / "probe.json"
    # As root OpenMPI needs --allow-run-as-root; 3 ranks on 2 cores need --oversubscribe.
    p = run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "3", PYTHON, "-m", "ringrt.jobs.probe",
             "--seq-len", "48", "--out", str(out)], env={"OMPI_MCA_btl": "self,tcp"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    result = check_probe(out, world=3, launcher="mpi")
    assert len({r["pid"] for r in result["ranks"]}) == 3
