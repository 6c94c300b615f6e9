# Sourced by the quick-start scripts: make .venv with the package and its test tools, idempotently.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON:-python3}"
if [ ! -x "$_root/.venv/bin/python" ]; then
    "$_py" -m venv "$_root/.venv"
fi
_stamp="$_root/.venv/.dist-train-installed"
if [ ! -f "$_stamp" ] || [ "$_root/pyproject.toml" -nt "$_stamp" ]; then
    echo "installing dist_train and its dependencies into .venv (first run takes a few minutes)..." >&2
    # pip's and setuptools' chatter (an editable install always prints an informational
    # BuildBackendWarning) goes to a log that is shown only when the install fails.
    _log="$_root/.venv/install.log"
    # An old pip (23.x) gives up resolving s3fs/fsspec pins that a current one solves.
    "$_root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" \
        >"$_log" 2>&1 || echo "warning: could not upgrade pip (see $_log); trying the install anyway" >&2
    if ! "$_root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$_root[dev]" \
        >>"$_log" 2>&1; then
        cat "$_log" >&2
        echo "install failed (log: $_log)" >&2
        exit 1
    fi
    "$_root/.venv/bin/python" -c "import dist_train, torch, torchvision, s3fs, moto" \
        || { echo "install failed" >&2; exit 1; }
    touch "$_stamp"
fi
