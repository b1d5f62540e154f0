#!/usr/bin/env bash
# Set up and run every benchmark side by side; prints the table and writes
# bench/results/latest.{md,json}. Options: --quick, --only "cl_tasks sqlite,redis", --no-compute.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,flower
exec .venv/bin/python -m bench.run "$@"
