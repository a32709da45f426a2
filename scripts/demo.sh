#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the single-machine demo on a simulated Jungfrau 1M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stddaq-demo "${@:-configs/jungfrau_1m.json}"
