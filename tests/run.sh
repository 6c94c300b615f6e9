#!/usr/bin/env bash
# The test suite, from a fresh clone: installs what it needs into .venv (once), then runs pytest.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/ensure-env.sh
# Integration tests mostly wait (process start-up, torch imports, polling): three workers, one test
# file each at a time (module fixtures stay shared), keep the 2 cores busy. Files are handed out in
# collection order, which tests/conftest.py sorts longest first (not xdist's "most tests first").
# DT_TEST_WORKERS=0: serial.
workers="${DT_TEST_WORKERS:-3}"
if [ "$workers" = "0" ]; then
    exec .venv/bin/python -m pytest -q tests "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder tests "$@"
