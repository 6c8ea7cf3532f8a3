"""Evaluate under Hydra: ``python launch/eval.py eval.checkpoint=outputs/run-x/hf``.

Perplexity at multiples of the training length (vanilla vs Λ-mask) and passkey retrieval; rank 0
writes ``results.json`` (and plots) to the run directory. Distributed as for ``launch/train.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _edge  # noqa: E402
import hydra  # noqa: E402


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg) -> dict:
    with _edge.user_errors("launch/eval.py"):
        return _task(cfg)


def _task(cfg) -> dict:
    from ringrt.jobs.eval import run_eval
    from ringrt.distributed.launcher import global_rank, init_distributed
    from ringrt.runs import EvalRun

    run = _edge.to_schema(cfg, EvalRun)
    env = init_distributed(run.launcher.backend, run.launcher.timeout_s)
    _edge.started(env, run.eval.out_dir)
    _edge.write_resolved(run, run.eval.out_dir)
    result = run_eval(run.job(), print_fn=print if global_rank() == 0 else (lambda *a, **k: None))
    _edge.end_job()
    return result


if __name__ == "__main__":
    from ringrt.runs import EvalRun

    _edge.prepare(EvalRun)
    with _edge.interruptible("evaluation"):
        main()
    _edge.finish(0)
