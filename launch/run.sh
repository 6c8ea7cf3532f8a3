#!/usr/bin/env bash
# Thin torchrun wrapper (like torchtitan's run_train.sh). Arguments are what you would give `python`.
#
#   ./launch/run.sh launch/train.py train.steps=100                 # this machine, all GPUs (or 1 CPU rank)
#   NPROC_PER_NODE=4 ./launch/run.sh -m ringrt.probe                 # 4 local ranks
#   NNODES=2 RDZV_ENDPOINT=node0:29400 ./launch/run.sh launch/train.py hydra.run.dir=/shared/runs/x
#                                                                    # run the same line on every node
# Environment: NPROC_PER_NODE (default: GPUs, else 1), NNODES (1), RDZV_ENDPOINT (host:port; c10d
# rendezvous, required when NNODES > 1), RDZV_ID (ringrt), MAX_RESTARTS (0), TORCHRUN (torchrun).
set -euo pipefail

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
if [ -n "${RDZV_ENDPOINT:-}" ]; then
    rdzv=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-ringrt}")
elif [ "$NNODES" = 1 ]; then
    rdzv=(--standalone)
else
    echo "run.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node's address)" >&2
    exit 2
fi
if [ $# -eq 0 ]; then
    echo "usage: run.sh <script.py | -m module> [args...]" >&2
    exit 2
fi
set -x
exec ${TORCHRUN:-torchrun} --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}" \
    --max-restarts="${MAX_RESTARTS:-0}" "$@"
