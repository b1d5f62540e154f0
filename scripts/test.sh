#!/usr/bin/env bash
# Set up and run the whole test suite (plus ruff and mypy). Needs the machine's
# RabbitMQ (127.0.0.1:5672), Mosquitto (127.0.0.1:1883), PostgreSQL (127.0.0.1:5432, database
# `test`, trust auth) and Redis (127.0.0.1:6379); installs Chromium as root.
# Extra arguments go to pytest, e.g. scripts/test.sh -k contract
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,flower,suite
# The Flower browser test drives Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "scripts/test.sh: Debian's chromium is missing; install it (sudo apt-get install chromium)" >&2
  fi
fi
# Runners are confined with Debian's bubblewrap (cl_tasks.confinement); the tests expect it.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }
  else
    echo "scripts/test.sh: Debian's bubblewrap is missing; install it (sudo apt-get install bubblewrap)" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Every test on the embedded stack (SQLite broker and jobs table), then the tests marked
# `stack` again on each "beyond one machine" stack: the machine's RabbitMQ or Redis as
# broker, PostgreSQL for the jobs table (set CL_TASKS_TEST_STACKS to choose; empty = none).
# The stacks share nothing (each test has its own vhost, Redis db and PostgreSQL database),
# so they run side by side; their output is shown when both are done.
.venv/bin/pytest -q --durations=15 "$@"
# A fast subset of Celery's own integration suite (chords, groups, chains, revoke, expires,
# inspect: ~40 tests, ~2 min) on our broker and result backend; the full run and its table
# (docs/celery-suite.md) are scripts/celery-suite.sh's.
suite_failed=0
CL_TASKS_SUITE_SKIP_SETUP=1 scripts/celery-suite.sh --ci || suite_failed=1
logs=$(mktemp -d)
pids=()
stacks=(${CL_TASKS_TEST_STACKS-rabbitmq+postgresql redis+postgresql})
for stack in "${stacks[@]}"; do
  CL_TASKS_TEST_STACK="$stack" .venv/bin/pytest -q -m stack -p no:cacheprovider \
    --basetemp="$logs/$stack.tmp" "$@" >"$logs/$stack.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!stacks[@]}"; do
  wait "${pids[$i]}" || failed=1
  echo "== tests marked 'stack' on ${stacks[$i]}"
  tail -n 40 "$logs/${stacks[$i]}.log"
done
rm -rf "$logs"
[ "$suite_failed" = 0 ] || { echo "== Celery's integration suite (CI subset) failed: see above"; failed=1; }
exit "$failed"
