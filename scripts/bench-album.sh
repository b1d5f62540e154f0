#!/usr/bin/env bash
# The album-import benchmark (bench/album.py): N 12 MP photos, a 256 px and a 1280 px job each,
# through a -c 2 worker vs libvips in 2 processes. Prints JSON. Options: --photos N, --no-memory.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,flower
exec .venv/bin/python -m bench.album "$@"
