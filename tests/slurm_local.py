"""The tests' Slurm cluster is the one ``ringrt cluster up`` starts (:class:`ringrt.cluster.LocalSlurm`):
munged + slurmctld + two emulated slurmd nodes, in a temp directory with its own ports and munge
socket, so it never touches a Slurm that may already run on the box. ``start()`` waits until both
nodes are idle; ``stop()`` stops exactly the daemons it started (and what is left of their jobs)."""

from __future__ import annotations

import os
import subprocess

from ringrt import cluster


def available() -> bool:
    """Slurm and munge installed, and we are root (the cluster refuses otherwise)."""
    return not cluster.missing_programs() and os.geteuid() == 0


class LocalSlurm(cluster.LocalSlurm):
    """Two emulated nodes ``n1``, ``n2`` (8 CPUs each, whatever the machine has) in partition ``debug``."""

    def sbatch_wait(self, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        """Start ``sbatch --wait`` (it ends when the job ends, with the job's exit code).

        Returns at once so several jobs can run together: sbatch polls the job with growing
        intervals, so jobs waited for one after another cost tens of seconds each.
        """
        return subprocess.Popen(["sbatch", "--wait", *args], env={**self.env, **(extra_env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
