#!/usr/bin/env bash
# Set up and start a worker on the embedded default broker: SQLite
# $CL_SERVER_DIR/media_store.db (./data/media_store.db unless set).
# Extra arguments go to `celery worker`, e.g. scripts/worker.sh -Q image_resize -c 2
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/cl-tasks worker "$@"
