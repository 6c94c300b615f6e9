# Sourced by the launch scripts: how to run dist-train here, and how many workers a node gets.
#
#   DIST_TRAIN        the command that runs the CLI, e.g. "python3 -m dist_train" (default: `dist-train`
#                     on PATH, else this checkout's .venv, created by ensure-env.sh if missing)
#   NPROC_PER_NODE    workers on this node (default: one per GPU; without a GPU one per two CPU cores, 1..8)

_launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ -n "${DIST_TRAIN:-}" ]; then
    read -r -a DIST_TRAIN_CMD <<< "$DIST_TRAIN"
elif command -v dist-train >/dev/null 2>&1; then
    DIST_TRAIN_CMD=(dist-train)
else
    source "$_launch_dir/ensure-env.sh"
    DIST_TRAIN_CMD=("$_launch_dir/../.venv/bin/python" -m dist_train)
fi

default_nproc_per_node() {
    local gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [ "${gpus:-0}" -gt 0 ]; then
        echo "$gpus"
    else
        local cores
        cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
        local ranks=$(( cores / 2 ))
        [ "$ranks" -lt 1 ] && ranks=1
        [ "$ranks" -gt 8 ] && ranks=8
        echo "$ranks"
    fi
}
NPROC_PER_NODE="${NPROC_PER_NODE:-$(default_nproc_per_node)}"
