"""Hydra entry points: typed schemas reject bad configs, torchrun ranks share one run dir where only
rank 0 writes, the train job logs system metrics (JSONL + W&B offline), and -m sweeps run through
submitit_local with each job starting its own ranks."""

from __future__ import annotations

import json
import shutil

import pytest

from ringrt.runs import TrainRun
from ringrt.run.schema import ConfigError, from_dict
from tests.launch_util import PYTHON, REPO, check_probe, run

TORCHRUN = shutil.which("torchrun")
TINY = ["data.seq_len=64", "data.batch_size=2", "train.warmup_steps=2"]


def test_schema_rejects_typos_and_wrong_types():
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layrs'; did you mean 'n_layers'\?"):
        from_dict(TrainRun, {"model": {"n_layrs": 2}})
    with pytest.raises(ConfigError, match=r"train.steps='10' must be an integer"):
        from_dict(TrainRun, {"train": {"steps": "10"}})
    with pytest.raises(ConfigError, match=r"logging.wandb='on' is not valid; valid: 'offline', 'online', 'disabled'"):
        from_dict(TrainRun, {"logging": {"wandb": "on"}})
    with pytest.raises(ConfigError, match=r"attention.layout='zigzagg' is not valid; valid: 'zigzag', 'contiguous'"):
        from_dict(TrainRun, {"attention": {"layout": "zigzagg"}})
    with pytest.raises(ConfigError, match=r"train.resume=1 must be true or false"):
        from_dict(TrainRun, {"train": {"resume": 1}})
    with pytest.raises(ConfigError, match=r"launcher.backend='mpi' is not valid; valid: 'auto', 'gloo', 'nccl'"):
        from_dict(TrainRun, {"launcher": {"backend": "mpi"}})
    run_cfg = from_dict(TrainRun, {"train": {"betas": [0.9, 0.99], "lr": 1}, "model": {"n_kv_heads": None}})
    assert run_cfg.train.betas == (0.9, 0.99) and run_cfg.train.lr == 1.0 and isinstance(run_cfg.train.lr, float)


@pytest.mark.timeout(120)
def test_entry_point_rejects_bad_config_before_running(tmp_path):
    p = run([PYTHON, str(REPO / "launch" / "train.py"), "+model.n_layrs=2", f"hydra.run.dir={tmp_path}/r"])
    assert p.returncode != 0
    assert "unknown key 'model.n_layrs'; did you mean 'n_layers'?" in p.stderr
    p = run([PYTHON, str(REPO / "launch" / "train.py"), "train.steps=ten", f"hydra.run.dir={tmp_path}/r"])
    assert p.returncode != 0 and "train.steps='ten' must be an integer" in p.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.timeout(180)
def test_torchrun_train_shared_dir_rank0_writes(tmp_path):
    p = run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "train.py"), *TINY,
             "train.steps=4", "train.log_every=2", "logging.wandb=offline"], cwd=tmp_path, timeout=150)
    assert p.returncode == 0, p.stderr[-4000:]
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run-"), runs  # one directory for both ranks
    d = runs[0]
    log = (d / "train.log").read_text()
    assert "rank 0/2 started by torchrun" in log and "rank 1/2" not in log  # only rank 0 writes the log
    assert "rank 1/2 started by torchrun" in p.stdout
    assert (d / ".hydra" / "config.yaml").is_file() and (d / "run_config.yaml").is_file()
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # written once (rank 0), not once per rank
    for r in rows:
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_s"] > r["tokens_per_s"]
        assert r["peak_mem_bytes"] > 0 and r["comm_bytes"] > 0  # the ring moved bytes
    assert len(list((d / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.timeout(60)
def test_sweep_inside_torchrun_is_refused(tmp_path):
    p = run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "probe.py"), "-m", "probe.seed=0,1"],
            cwd=tmp_path)
    assert p.returncode != 0
    assert "'-m' sweeps cannot run inside a torchrun launch of 2 ranks" in p.stderr
    assert not (tmp_path / "multirun").exists()


@pytest.mark.timeout(240)
def test_submitit_local_sweep_each_job_starts_its_ranks(tmp_path):
    p = run([PYTHON, str(REPO / "launch" / "probe.py"), "-m", "hydra/launcher=submitit_local",
             "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=4", "probe.seed=0,1",
             f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, timeout=220)
    assert p.returncode == 0, p.stderr[-4000:]
    for job, seed in ((0, 0), (1, 1)):
        result = check_probe(tmp_path / "sweep" / str(job) / "probe.json", world=2, launcher="submitit")
        assert result["config"]["seed"] == seed
        log = (tmp_path / "sweep" / str(job) / "probe.log").read_text()
        assert "rank 0/2 started by submitit" in log and "rank 1/2" not in log


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.timeout(200)
def test_train_then_generate_and_distributed_eval(tmp_path):
    """The other entry points run on what launch/train.py wrote (generate: 1 process, eval: 2 ranks)."""
    p = run([PYTHON, str(REPO / "launch" / "train.py"), *TINY, "train.steps=2", "logging.wandb=disabled",
             f"hydra.run.dir={tmp_path}/train"])
    assert p.returncode == 0, p.stderr[-3000:]
    hf = tmp_path / "train" / "hf"
    p = run([PYTHON, str(REPO / "launch" / "generate.py"), f"generate.checkpoint={hf}", "generate.prompt=def f",
             "generate.max_new_tokens=4", f"hydra.run.dir={tmp_path}/gen"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "gen" / "run_config.yaml").is_file()
    p = run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "eval.py"), f"eval.checkpoint={hf}",
             "eval.tokens=256", "eval.multiples=[1,2]", f"hydra.run.dir={tmp_path}/eval"], timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results and (tmp_path / "eval" / ".hydra" / "config.yaml").is_file()


def test_conf_lists_every_schema_field():
    """Each composed config names every field of its schema (so any field can be overridden without '+')."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ringrt.runs import EvalRun, GenerateRun, ProbeRun

    def missing(cls, data, prefix=""):
        out = []
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if f.name not in data:
                out.append(key)
            elif dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
                sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                out += missing(type(sub), data[f.name], key + ".")
        return out

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name, schema in (("config", TrainRun), ("eval", EvalRun), ("generate", GenerateRun), ("probe", ProbeRun)):
            cfg = compose(config_name=name, overrides=["mask=lambda", "deepspeed=zero3"] if name == "config" else [])
            data = OmegaConf.to_container(cfg, resolve=False)
            assert missing(schema, data) == [], (name, missing(schema, data))
            if name == "config":
                assert data["attention"]["lambda_mask"] is True and data["deepspeed"]["zero_stage"] == 3
