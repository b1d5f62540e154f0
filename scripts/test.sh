#!/usr/bin/env bash
# Set up and run the whole test suite (plus ruff and mypy). Needs the machine's
# RabbitMQ (127.0.0.1:5672) and Mosquitto (127.0.0.1:1883); installs Chromium as root.
# Extra arguments go to pytest, e.g. scripts/test.sh -k contract
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,flower
# The Flower browser test drives Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "scripts/test.sh: Debian's chromium is missing; install it (sudo apt-get install chromium)" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
