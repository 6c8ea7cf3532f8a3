"""DeepSpeed ZeRO 1-3 on CPU around sequence-parallel attention: the same losses as the plain
trainer (torch AdamW, gradients summed over the sequence group, averaged over replicas).

Stages 1 and 2 are bit-identical to the plain trainer; stage 3 flattens and partitions parameters,
so its sums run in another order: measured differences ~5e-7 on losses of ~5 (fp32), tolerance 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

from tests.distributed import run

assert importlib.util.find_spec("deepspeed") is not None, "deepspeed missing: pip install 'ringrt[deepspeed]'"


def _losses(rank, world, stages, data_parallel, steps=3, layers=2):
    os.environ["DS_ACCELERATOR"] = "cpu"
    for k, v in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
        os.environ.setdefault(k, str(v))
    from ringrt.data.config import DataConfig
    from ringrt.engines.deepspeed import DeepSpeedConfig, run_train_deepspeed
    from ringrt.jobs.config import TrainConfig, TrainJobConfig
    from ringrt.jobs.train import run_train
    from ringrt.run.metrics import MetricsLogger
    from ringrt.model.config import ModelConfig

    cfg = TrainJobConfig(
        model=ModelConfig(dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, tie_embeddings=False),
        data=DataConfig(seq_len=64, batch_size=2),
        train=TrainConfig(steps=steps, warmup_steps=2, data_parallel=data_parallel, ckpt_every=0, progress=False,
                          out_dir=tempfile.mkdtemp(prefix="ringrt-ds-")),
    )
    plain = run_train(cfg, logger=MetricsLogger([], enabled=False))["losses"]
    return plain, {s: run_train_deepspeed(cfg, DeepSpeedConfig(zero_stage=s))["losses"] for s in stages}


@pytest.mark.timeout(240)
def test_zero_1_2_3_sequence_parallel_matches_plain_trainer():
    for plain, by_stage in run(_losses, 2, (1, 2, 3), 1, timeout=220):  # 2 sequence ranks, 1 replica
        assert len(plain) == 3 and plain[-1] < plain[0]
        assert by_stage[1] == plain and by_stage[2] == plain
        assert by_stage[3] == pytest.approx(plain, rel=1e-5, abs=0)


@pytest.mark.timeout(240)
def test_zero3_data_x_sequence_mesh():
    """4 ranks = 2 replicas x 2 sequence ranks: DeepSpeed's data-parallel group excludes the sequence dimension."""
    results = run(_losses, 4, (3,), 2, 2, 1, timeout=220)  # 2 steps, 1 layer: 4 ranks share 2 cores
    for plain, by_stage in results:
        assert by_stage[3] == pytest.approx(plain, rel=1e-5, abs=0)
    assert all(r[0] == results[0][0] for r in results)  # every rank reports the replica-averaged loss


@pytest.mark.timeout(200)
def test_torchrun_hydra_engine_deepspeed(tmp_path):
    """``launch/train.py engine=deepspeed`` under torchrun logs the same losses as ``engine=torch``."""
    import json
    import shutil

    from tests.launch_util import REPO, run as run_cmd

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    losses = {}
    for engine in ("torch", "deepspeed"):
        d = tmp_path / engine
        p = run_cmd([torchrun, "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "train.py"),
                     f"engine={engine}", "deepspeed=zero2", "model.tie_embeddings=false", "train.steps=3",
                     "train.log_every=1", "train.warmup_steps=2", "data.seq_len=64", "data.batch_size=2",
                     "logging.wandb=disabled", "train.ckpt_every=0", f"hydra.run.dir={d}"], timeout=90)
        assert p.returncode == 0, p.stderr[-4000:]
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        losses[engine] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["torch"]) == 3 and losses["deepspeed"] == losses["torch"]
