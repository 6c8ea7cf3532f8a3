"""Generate under Hydra: ``python launch/generate.py generate.checkpoint=outputs/run-x/hf generate.prompt="..."``.

Long prompts are prefilled sequence-parallel across the ranks; rank 0 prints the continuation.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _edge  # noqa: E402
import hydra  # noqa: E402


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg) -> dict:
    with _edge.user_errors("launch/generate.py"):
        return _task(cfg)


def _task(cfg) -> dict:
    from ringrt.jobs.generate import run_generate
    from ringrt.distributed.launcher import global_rank, init_distributed
    from ringrt.runs import GenerateRun

    run = _edge.to_schema(cfg, GenerateRun)
    env = init_distributed(run.launcher.backend, run.launcher.timeout_s)
    _edge.started(env, _edge.output_dir())
    _edge.write_resolved(run, _edge.output_dir())
    out = run_generate(run.job())
    if global_rank() == 0:
        print(out["text"], flush=True)
    _edge.end_job()
    return {"prompt_tokens": out["prompt_tokens"], "text": out["text"]}


if __name__ == "__main__":
    from ringrt.runs import GenerateRun

    _edge.prepare(GenerateRun)
    with _edge.interruptible("generation"):
        main()
    _edge.finish(0)
