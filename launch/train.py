"""Train under Hydra: ``python launch/train.py model=small train.steps=1000``.

Distributed: ``torchrun --nproc-per-node 8 launch/train.py ...``, ``sbatch slurm/torchrun.sbatch
launch/train.py ...``; sweeps: ``python launch/train.py -m hydra/launcher=submitit_slurm train.lr=1e-3,3e-3``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _edge  # noqa: E402  (makes the resolvers and checks available before Hydra starts)
import hydra  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> dict:
    with _edge.user_errors("launch/train.py"):
        return _task(cfg)


def _task(cfg) -> dict:
    from ringrt.jobs.train import run_train
    from ringrt.distributed.launcher import init_distributed
    from ringrt.model.llama import Llama
    from ringrt.runs import TrainRun
    from ringrt.run.schema import to_dict
    from ringrt.run.metrics import metrics_logger, train_flops_per_token

    run = _edge.to_schema(cfg, TrainRun)
    env = init_distributed(run.launcher.backend, run.launcher.timeout_s)
    _edge.started(env, run.train.out_dir)
    if run.engine == "torch":  # DeepSpeed's engine writes no checkpoints ringrt resumes from
        _edge.resumable_in(run.train.out_dir)
    _edge.write_resolved(run, run.train.out_dir)
    n_params = sum(p.numel() for p in Llama(run.model).parameters())
    fpt = train_flops_per_token(n_params=n_params, n_layers=run.model.n_layers, dim=run.model.dim,
                                seq_len=run.data.seq_len, causal=True)
    logger = metrics_logger(run.logging, run.train.out_dir, config=to_dict(run), flops_per_token=fpt)
    try:
        if run.engine == "deepspeed":
            import os

            import torch

            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            _edge.quiet_deepspeed()
            from ringrt.engines.deepspeed import run_train_deepspeed

            result = run_train_deepspeed(run.job(), run.deepspeed, logger=logger)
        else:
            result = run_train(run.job(), logger=logger)
    finally:
        _edge.close_logger(logger)
    _edge.end_job()
    return {"step": result["step"], "loss": result["loss"], "losses": result["losses"]}


if __name__ == "__main__":
    from ringrt.runs import TrainRun

    _edge.prepare(TrainRun)
    with _edge.interruptible("training"):
        main()
    _edge.finish(0)
