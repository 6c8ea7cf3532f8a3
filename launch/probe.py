"""Check a launch end to end under Hydra: ``torchrun --nproc-per-node 2 launch/probe.py``.

Writes ``<run dir>/probe.json`` (rank 0) and exits non-zero if any rank's attention is off.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _edge  # noqa: E402
import hydra  # noqa: E402


@hydra.main(config_path="../conf", config_name="probe", version_base="1.3")
def main(cfg) -> dict:
    with _edge.user_errors("launch/probe.py"):
        return _task(cfg)


def _task(cfg) -> dict:
    from ringrt.jobs.probe import run_probe
    from ringrt.runs import ProbeRun

    run = _edge.to_schema(cfg, ProbeRun)
    _edge.write_resolved(run, _edge.output_dir())
    result = run_probe(run.probe)
    from ringrt.distributed.launcher import detect

    _edge.started(detect(), _edge.output_dir())
    _edge.end_job()
    if not result["ok"]:
        raise RuntimeError(f"probe failed: {result['ranks']}")
    return {"ok": result["ok"], "world_size": result["world_size"], "launcher": result["launcher"]}


if __name__ == "__main__":
    from ringrt.runs import ProbeRun

    _edge.prepare(ProbeRun)
    with _edge.interruptible("probe"):
        main()
    _edge.finish(0)
