#!/usr/bin/env bash
# One node of a multi-node job; run it on every node with the same RDZV_HOST, NNODES and RDZV_ID.
# Node 0 hosts the c10d rendezvous store at RDZV_HOST:RDZV_PORT.
#
#   RDZV_HOST=node0 NNODES=2 NODE_RANK=0 launch/multi-node.sh --config job.yaml     # on node0
#   RDZV_HOST=node0 NNODES=2 NODE_RANK=1 launch/multi-node.sh --config job.yaml     # on node1
#
# Environment:
#   RDZV_HOST       host of node 0 (required)            RDZV_PORT     its port (29400)
#   NNODES          N or MIN:MAX (elastic) nodes (2)     RDZV_ID       job id shared by all nodes
#   NODE_RANK       this node's index; defaults to JOB_COMPLETION_INDEX (Kubernetes Indexed Job),
#                   then SLURM_NODEID. Node 0 hosts the rendezvous store.
#   MAX_RESTARTS    worker-group restarts before giving up (3)
#   LOCAL_ADDR      address other nodes reach this one at (default: torch's guess, the FQDN)
#   NPROC_PER_NODE, DIST_TRAIN   see launch/common.sh
# Arguments are `dist-train train` flags. Exit status: 0 done, 2 bad input, 3 superseded,
# 75 preempted (start it again to resume), 1 anything else.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${RDZV_HOST:?set RDZV_HOST to the host name or address of node 0}"
NODE_RANK="${NODE_RANK:-${JOB_COMPLETION_INDEX:-${SLURM_NODEID:-}}}"
options=(--nnodes "${NNODES:-2}" --nproc-per-node "$NPROC_PER_NODE"
         --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29400}"
         --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-dist-train}}" --max-restarts "${MAX_RESTARTS:-3}")
[ -n "$NODE_RANK" ] && options+=(--node-rank "$NODE_RANK")
[ -n "${LOCAL_ADDR:-}" ] && options+=(--local-addr "$LOCAL_ADDR")
exec "${DIST_TRAIN_CMD[@]}" launch "${options[@]}" -- train "$@"
