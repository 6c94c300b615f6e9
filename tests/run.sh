#!/usr/bin/env bash
# The test suite, from a fresh clone: installs what it needs into .venv (once), then runs pytest.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/ensure-env.sh
exec .venv/bin/python -m pytest -q tests "$@"
