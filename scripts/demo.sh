#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the single-machine demo: a simulated Jungfrau 1M,
# the whole std-daq, and a Bluesky plan writing images through the Ophyd device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stddaq-demo "$@"
