#!/usr/bin/env bash
# One command on a fresh GPU machine: benchmarks/device_check.py with its results in benchmarks/results/.
#   bash benchmarks/device_check.sh            # the full check (one H100 / H200, about 6 minutes)
#   bash benchmarks/device_check.sh --tiny     # the same code paths at toy sizes
# Extra arguments go to device_check.py. XLA may use most of the GPU's memory for its own allocator;
# the video section reads peak memory from it, so preallocation is off.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHON="${PYTHON:-python}"
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "$PYTHON" benchmarks/device_check.py "$@"
