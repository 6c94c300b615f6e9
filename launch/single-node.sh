#!/usr/bin/env bash
# One machine, every GPU (or, without one, CPU worker processes): `dist-train launch --standalone`.
#
#   launch/single-node.sh --run-dir s3://bucket/runs/digits --epochs 20 --checkpoint-every 200
#   NPROC_PER_NODE=4 launch/single-node.sh --config job.yaml
#
# Arguments are `dist-train train` flags. Environment: NPROC_PER_NODE, MAX_RESTARTS (default 0),
# DIST_TRAIN (see launch/common.sh). Exit status: 0 done, 2 bad input, 75 preempted (run it again
# to resume from the newest committed checkpoint), 1 anything else.
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec "${DIST_TRAIN_CMD[@]}" launch --standalone --nproc-per-node "$NPROC_PER_NODE" \
    --max-restarts "${MAX_RESTARTS:-0}" -- train "$@"
