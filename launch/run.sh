#!/usr/bin/env bash
# torchrun for this repository (like torchtitan's run_train.sh). Arguments are what you would give `python`.
#
#   ./launch/run.sh launch/train.py train.steps=100                 # this machine, all GPUs (or 1 CPU rank)
#   NPROC_PER_NODE=4 ./launch/run.sh -m ringrt.jobs.probe                 # 4 local ranks
#   NNODES=2 RDZV_ENDPOINT=node0:29400 ./launch/run.sh launch/train.py hydra.run.dir=/shared/runs/x
#                                                                    # run the same line on every node
# Environment: NPROC_PER_NODE (default: GPUs, else 1), NNODES (1), RDZV_ENDPOINT (host:port; c10d
# rendezvous, required when NNODES > 1), RDZV_ID (ringrt), MAX_RESTARTS (0), PYTHON (python3),
# OMP_NUM_THREADS (default: this machine's cores / NPROC_PER_NODE, at least 1).
#
# One node: everything listens on 127.0.0.1 only (launch/_torchrun.py: a file rendezvous instead of
# --standalone). Many nodes: the c10d store at RDZV_ENDPOINT, the agent's store for the workers and
# gloo/NCCL listen on the nodes' network interfaces (docs/launch.md, "What listens where").
# Ctrl-C: each rank prints where it stopped and the command that resumes it; exit code 130.
set -euo pipefail

# The words that started this launch (not the program or its arguments, which may hold secrets
# in logs): the ranks print them in "resume with: ..." after Ctrl-C.
launch_words=""
for v in NNODES NPROC_PER_NODE RDZV_ENDPOINT RDZV_ID MAX_RESTARTS PYTHON; do
    if [ -n "${!v:-}" ]; then launch_words+="$v=$(printf %q "${!v}") "; fi
done
export RINGRT_LAUNCH_COMMAND="${launch_words}$(printf %q "$0")"

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
# The cores shared out among the local ranks (torchrun would set 1 and print a banner saying so).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    threads=$(( $(nproc) / NPROC_PER_NODE ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
if [ -n "${RDZV_ENDPOINT:-}" ]; then
    rdzv=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-ringrt}")
    where="c10d rendezvous $RDZV_ENDPOINT id ${RDZV_ID:-ringrt} (listens on the network)"
elif [ "$NNODES" = 1 ]; then
    rdzv=()
    where="this machine, 127.0.0.1 only"
else
    echo "run.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node's address)" >&2
    exit 2
fi
if [ $# -eq 0 ]; then
    echo "usage: run.sh <script.py | -m module> [args...]" >&2
    exit 2
fi
# One line about the launch; never the program's arguments (overrides can carry keys and tokens).
echo "run.sh: nnodes=$NNODES nproc_per_node=$NPROC_PER_NODE max_restarts=${MAX_RESTARTS:-0} rendezvous: $where" >&2
exec "${PYTHON:-python3}" "$(dirname "$0")/_torchrun.py" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    ${rdzv[@]+"${rdzv[@]}"} --max-restarts="${MAX_RESTARTS:-0}" "$@"
