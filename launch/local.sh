#!/usr/bin/env bash
# Quick start: 2-process DDP training on the embedded digits data set (no download), checkpoints
# under runs/quickstart. Installs into .venv on first use. Extra arguments go to `dist-train train`.
# Run it again and it resumes from the newest valid checkpoint (finished runs exit at once).
# `dist-train launch` is torchrun's agent with statuses a shell can act on: Ctrl-C (or SIGTERM)
# commits a checkpoint and exits 75 (run it again to resume), 2 is bad input, 0 finished.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/ensure-env.sh
NPROC="${NPROC:-2}"
exec .venv/bin/python -m dist_train launch --standalone --nproc-per-node "$NPROC" -- train \
    --run-dir "${RUN_DIR:-runs/quickstart}" --checkpoint-every 50 --keep-last 3 "$@"
