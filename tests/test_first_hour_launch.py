"""The first hour with the launch recipes: each README line below runs as pasted into a shell (as
root, on a 2-core box), a Hydra key typo says our one line first, a local sweep prints one result
line per job, ``ringrt cluster up|down|status`` gives a Slurm to try the sbatch recipes on, and the
console stays free of launcher, W&B and DeepSpeed noise."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import slurm_local
from tests.launch_util import PYTHON, REPO, check_probe, free_port, run

# The README's lines, exactly as a user pastes them (run from the repository root).
GENERATE_LINE = """python launch/generate.py generate.checkpoint=outputs/demo/train/hf 'generate.prompt="def f(x):"'"""
MPIRUN_LINE = "mpirun --allow-run-as-root --oversubscribe -np 2 python launch/train.py train.steps=20"
TINY = ["data.seq_len=64", "data.batch_size=2", "train.warmup_steps=2", "train.steps=2"]
OMP_BANNER = "Setting OMP_NUM_THREADS environment variable"


def _checkout(tmp: Path) -> Path:
    """A directory that looks like the repository root to the recipes (launch/, conf/, slurm/), whose
    outputs/ and multirun/ are the test's own."""
    for name in ("launch", "conf", "slurm"):
        (tmp / name).symlink_to(REPO / name)
    return tmp


def _shell(line: str, cwd: Path, *, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``bash -c <line>`` with this interpreter first on PATH (``python`` in the line is ours)."""
    path = os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")])
    return run(["bash", "-c", line], cwd=cwd, timeout=timeout, env={"PATH": path, **(env or {})})


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _tiny_model(root: Path, run_dir: str) -> Path:
    p = run([PYTHON, str(REPO / "launch" / "train.py"), *TINY, "logging.wandb=disabled", f"hydra.run.dir={run_dir}"],
            cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / run_dir / "hf"


def test_readme_quotes_the_tested_recipes():
    """The lines these tests run are the README's (a recipe that changes there changes here)."""
    readme = (REPO / "README.md").read_text()
    for line in (GENERATE_LINE, MPIRUN_LINE, "ringrt cluster up", "export SLURM_CONF="):
        assert line in readme, line


@pytest.mark.timeout(120)
def test_generate_prompt_as_pasted(tmp_path):
    root = _checkout(tmp_path)
    _tiny_model(root, "outputs/demo/train")
    p = _shell(GENERATE_LINE, root)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (config,) = root.glob("outputs/20*/*/run_config.yaml")  # one process: Hydra's outputs/<date>/<time>
    assert "prompt: 'def f(x):'" in config.read_text()
    # The form the shell breaks (its quotes go, Hydra's grammar chokes on the parenthesis): one line of
    # ours that shows the form that works, instead of Hydra's "mismatched input '('".
    broken = GENERATE_LINE.replace("""'generate.prompt="def f(x):"'""", '''generate.prompt="def f(x):"''')
    p = _shell(broken, root)
    assert p.returncode != 0 and p.stdout == ""
    assert _lines(p.stderr) == [
        "config error: Hydra cannot parse the override 'generate.prompt=def f(x):' (mismatched input '(' expecting "
        """<EOF>); if the shell removed its quotes, quote the whole override: 'generate.prompt="def f(x):"'"""], p.stderr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt: openmpi-bin libopenmpi-dev)")
@pytest.mark.timeout(180)
def test_mpirun_recipe_as_pasted(tmp_path):
    """As root and with as many ranks as cores or more, OpenMPI needs the two flags the README line has."""
    p = _shell(MPIRUN_LINE, _checkout(tmp_path), timeout=170)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and rows[-1]["comm_bytes"] > 0  # 2 ranks, one ring
    assert "rank 1/2 started by mpi" in p.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script, override, expected", [
    ("train.py", "model.n_layrs=2", "config error: unknown key 'model.n_layrs'; did you mean 'n_layers'? valid keys "
                                    "of model: vocab_size, dim, n_layers,"),
    ("train.py", "modle=small", "config error: unknown key 'modle'; did you mean 'model'?"),
    ("eval.py", "eval.multipels=[1,2]", "config error: unknown key 'eval.multipels'; did you mean 'multiples'?"),
])
def test_key_typo_says_ours_first_and_only(tmp_path, script, override, expected):
    """Not Hydra's "To append to your config use +model.n_layrs=2" (the wrong fix): our one line, exit 1."""
    p = run([PYTHON, str(REPO / "launch" / script), override, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert p.returncode == 1
    assert p.stdout == "" and len(_lines(p.stderr)) == 1, p.stderr
    assert p.stderr.startswith(expected), p.stderr
    assert not (tmp_path / "r").exists()  # stopped before Hydra made the run directory


@pytest.mark.timeout(150)
def test_local_sweep_prints_one_result_line_per_job(tmp_path):
    p = run([PYTHON, "launch/train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
             "hydra.launcher.timeout_min=3", *TINY, "logging.wandb=disabled", "train.lr=1e-3,3e-3"],
            cwd=_checkout(tmp_path), timeout=140)
    assert p.returncode == 0, p.stderr[-4000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")  # Hydra's default multirun/<date>/<time>
    lines = [line for line in p.stdout.splitlines() if line.startswith("sweep job ")]
    assert len(lines) == 2, p.stdout[-3000:]
    for job, (line, lr) in enumerate(zip(lines, ("0.001", "0.003"), strict=True)):
        last = json.loads((sweep / str(job) / "metrics.jsonl").read_text().splitlines()[-1])
        where = sweep.relative_to(tmp_path) / str(job)
        assert line == f"sweep job {job} (train.lr={lr}): step 2 | loss {last['loss']:.4g} -> {where}", line
    assert p.stdout.rstrip().endswith(lines[-1])  # at the end, after the jobs' own output


def test_multirun_is_ignored_by_git():
    patterns = (REPO / ".gitignore").read_text().split()
    assert "/multirun/" in patterns or "multirun/" in patterns


@pytest.mark.timeout(120)
def test_run_sh_sets_omp_threads_without_the_banner(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run([str(REPO / "launch" / "run.sh"), "-m", "ringrt.jobs.probe", "--seq-len", "48", "--out",
                        str(tmp_path / "probe.json")], cwd=tmp_path, env={**env, "NPROC_PER_NODE": "2"},
                       capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr[-3000:]
    assert OMP_BANNER not in p.stderr and "*****" not in p.stderr, p.stderr
    check_probe(tmp_path / "probe.json", world=2, launcher="torchrun")


@pytest.mark.timeout(90)
def test_wandb_offline_run_is_quiet(tmp_path):
    """W&B offline: no ~20-line banner and summary per run (needs ringrt/run/metrics.py to create the run
    with ``wandb.Settings(silent=True)`` in offline mode); the run is still written."""
    pytest.importorskip("wandb")
    p = run([PYTHON, str(REPO / "launch" / "train.py"), *TINY, "logging.wandb=offline", f"hydra.run.dir={tmp_path}/r"],
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    wandb_lines = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("wandb:")]
    assert len(wandb_lines) <= 1, wandb_lines
    assert len(list((tmp_path / "r" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.timeout(150)
def test_deepspeed_run_without_future_warnings(tmp_path):
    pytest.importorskip("deepspeed")
    p = run([shutil.which("torchrun"), "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "train.py"),
             "engine=deepspeed", "deepspeed=zero3", *TINY, "logging.wandb=disabled", f"hydra.run.dir={tmp_path}/r"],
            cwd=tmp_path, timeout=140)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "FutureWarning" not in p.stderr, p.stderr[-3000:]
    assert "compilers.C.base" not in p.stdout  # DeepSpeed's gcc probes, four INFO lines per rank
    assert re.search(r"step +2 \| loss", p.stdout)


def test_bench_compare_quick_help_says_how_long():
    from ringrt.bench import compare

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    text = " ".join(p.format_help().split())
    assert "about a minute" not in text and "about 5 min on an idle 2-core box" in text


# -- ringrt cluster ------------------------------------------------------------------------------------------


def test_cluster_refuses_clearly(monkeypatch, capsys, tmp_path):
    from ringrt import cluster
    from ringrt.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["cluster", "up", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringrt cluster up: a one-machine Slurm cluster needs root") and len(_lines(err)) == 1
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster, "_program", lambda name: None if name in ("slurmctld", "munged") else "/bin/true")
    assert main(["cluster", "up", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing: munged, slurmctld" in err and "bash .ci/apt-packages.sh" in err and len(_lines(err)) == 1
    assert not (tmp_path / "daemons.json").exists()


@pytest.mark.skipif(not slurm_local.available() or os.geteuid() != 0, reason="needs root, slurm-wlm and munge")
@pytest.mark.timeout(240)
def test_cluster_up_sbatch_down(tmp_path):
    """``ringrt cluster up`` -> the printed ``export SLURM_CONF=...`` -> ``sbatch --wait`` a trivial job and the
    torchrun template -> ``ringrt cluster down``: every daemon it started is gone."""
    d = tmp_path / "slurm"
    ringrt = [PYTHON, "-m", "ringrt", "cluster"]
    up = run([*ringrt, "up", "--dir", str(d)], timeout=90)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout == f"export SLURM_CONF={d}/slurm.conf\n"  # stdout is the line to paste (or eval)
        assert "nodes n1, n2 in partition debug" in up.stderr and f"ringrt cluster down --dir {d}" in up.stderr
        pids = json.loads((d / "daemons.json").read_text())
        assert sorted(pids) == ["munged", "slurmctld", "slurmd n1", "slurmd n2"]
        status = run([*ringrt, "status", "--dir", str(d)])
        assert status.returncode == 0 and "n1 idle, n2 idle" in status.stdout, status.stdout + status.stderr
        again = run([*ringrt, "up", "--dir", str(d)])
        assert again.returncode == 0 and "already up" in again.stderr
        assert json.loads((d / "daemons.json").read_text()) == pids  # the same daemons, not new ones

        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["SLURM_CONF"] = up.stdout.strip().split("=", 1)[1]
        trivial = subprocess.Popen(["sbatch", "--wait", f"--output={tmp_path}/trivial.out", "--wrap",
                                    "echo hello from $SLURM_JOB_ID"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        probe = subprocess.Popen(["sbatch", "--wait", "--nodes=1", f"--output={tmp_path}/probe.out", f"--chdir={REPO}",
                                  str(REPO / "slurm" / "torchrun.sbatch"), "-m", "ringrt.jobs.probe", "--seq-len", "48",
                                  "--out", str(tmp_path / "probe.json")],
                                 env={**env, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port())},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert trivial.wait(timeout=120) == 0, trivial.stderr.read()
        assert (tmp_path / "trivial.out").read_text().startswith("hello from ")
        assert probe.wait(timeout=150) == 0, (tmp_path / "probe.out").read_text()[-3000:]
        log = (tmp_path / "probe.out").read_text()
        assert "nproc_per_node=2" in log and OMP_BANNER not in log, log  # the template set OMP_NUM_THREADS
        check_probe(tmp_path / "probe.json", world=2, launcher="torchrun")
    finally:
        down = run([*ringrt, "down", "--dir", str(d)], timeout=90)
    assert down.returncode == 0 and "stopped" in down.stderr, down.stderr
    for name, pid in pids.items():
        assert not _running(pid), (name, pid)
    status = run([*ringrt, "status", "--dir", str(d)])
    assert status.returncode == 1 and "down" in status.stdout
    assert (d / "log" / "slurmctld.log").is_file()  # the logs stay


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
