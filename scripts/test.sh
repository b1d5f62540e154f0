#!/usr/bin/env bash
# Set up and run the whole test suite (plus ruff and mypy). Needs the machine's
# RabbitMQ on 127.0.0.1:5672 (the contract suite runs on it too).
# Extra arguments go to pytest, e.g. scripts/test.sh -k contract
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,flower
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
