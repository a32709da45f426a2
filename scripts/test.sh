#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest "$@" || status=$?
# pytest exit 5 = no tests collected (e.g. a -k filter): not a failure of the code.
[ "$status" -eq 5 ] && status=0
exit "$status"
