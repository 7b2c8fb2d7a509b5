#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs ruff and the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow Monte-Carlo tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="${EFFORTLESS_VENV:-.venv}/bin/python"
"$py" -m ruff check src tests benchmarks examples
"$py" -m pytest "$@"
