#!/usr/bin/env bash
# Celery's own integration suite (t/integration of the installed Celery's sdist), run unchanged on
#   ours+ours    our SQLite broker + our result backend (cl_tasks.results:ResultBackend)
#   ours+redis   our SQLite broker + Redis result backend
#   redis+redis  Redis + Redis, the reference
# and the pass/fail/skip table written to docs/celery-suite.md (scripts/celery_suite_report.py).
#
# Usage: scripts/celery-suite.sh                  every stack, then the table
#        scripts/celery-suite.sh ours+ours ...    some stacks, then the table (of what has run)
#        scripts/celery-suite.sh --ci             the fast subset (chords, groups, chains, revoke,
#                                                 expires, inspect) on ours+ours; exit 1 on a failure
# Extra pytest arguments go after `--` (test ids there, t/integration/..., replace the selection). Needs Redis on 127.0.0.1:6379 (the suite's side channel,
# even on ours+ours). Runs of the Redis stacks wait for each other (they use Redis db 0).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
ci=0
stacks=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) ci=1 ;;
    --) shift; break ;;
    ours+ours|ours+redis|redis+redis) stacks+=("$1") ;;
    *) echo "scripts/celery-suite.sh: unknown argument $1 (stacks: ours+ours ours+redis redis+redis; --ci)" >&2; exit 2 ;;
  esac
  shift
done
[ "${#stacks[@]}" -gt 0 ] || { [ "$ci" = 1 ] && stacks=(ours+ours); } || stacks=(ours+ours ours+redis redis+redis)
[ -n "${CL_TASKS_SUITE_SKIP_SETUP:-}" ] || scripts/setup.sh test,flower,suite

# -- the suite of the installed Celery, from its sdist (kept in .celery-suite/) ------------------
version=$(.venv/bin/python -c 'import celery; print(celery.__version__)')
suite="$root/.celery-suite/celery-$version"
if [ ! -f "$suite/t/integration/conftest.py" ]; then
  download=$(mktemp -d)
  .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: "celery==$version" -d "$download" 2>&1 \
    | grep -v '^WARNING: Location' >&2 || true
  mkdir -p "$suite"
  # Only the tests and their pytest settings (markers, xfail_strict): the sdist's own `celery`
  # package must not shadow the installed one.
  tar -xzf "$download/celery-$version.tar.gz" -C "$suite" --strip-components=1 \
    "celery-$version/t" "celery-$version/pyproject.toml"
  rm -rf "$download"
fi
files=(t/integration/test_tasks.py t/integration/test_canvas.py t/integration/test_inspect.py t/integration/test_serialization.py)
# The CI subset: ~40 tests (with parameters), under 2 minutes on ours+ours.
ci_tests=(
  "t/integration/test_canvas.py::test_chord::test_simple_chord_with_a_delay_in_group_save"
  "t/integration/test_canvas.py::test_chord::test_chord_order"
  "t/integration/test_canvas.py::test_chord::test_group_chain"
  "t/integration/test_canvas.py::test_chord::test_nested_group_chain"
  "t/integration/test_canvas.py::test_chord::test_single_task_header"
  "t/integration/test_canvas.py::test_chord::test_empty_header_chord"
  "t/integration/test_canvas.py::test_chord::test_nested_chord"
  "t/integration/test_canvas.py::test_chord::test_parallel_chords"
  "t/integration/test_canvas.py::test_chord::test_chord_in_chords_with_chains"
  "t/integration/test_canvas.py::test_chord::test_chain_chord_chain_chord"
  "t/integration/test_canvas.py::test_chord::test_large_header"
  "t/integration/test_canvas.py::test_chord::test_error_propagates_to_chord_from_group"
  "t/integration/test_canvas.py::test_chord::test_chord_header_task_replaced_with_chain"
  "t/integration/test_canvas.py::test_chord::test_replaced_nested_chord"
  "t/integration/test_canvas.py::test_chord::test_nested_chord_group"
  "t/integration/test_canvas.py::test_chain::test_simple_chain"
  "t/integration/test_canvas.py::test_chain::test_complex_chain"
  "t/integration/test_canvas.py::test_chain::test_group_results_in_chain"
  "t/integration/test_canvas.py::test_chain::test_chain_of_chords_with_two_tasks"
  "t/integration/test_canvas.py::test_chain::test_header_failure_fails_the_chords_after_it"
  "t/integration/test_canvas.py::test_chain::test_chain_of_nine_chords"
  "t/integration/test_canvas.py::test_group::test_nested_group"
  "t/integration/test_canvas.py::test_group::test_large_group"
  "t/integration/test_canvas.py::test_group::test_group_lone"
  "t/integration/test_canvas.py::test_group::test_nested_group_chord_counting_chord"
  "t/integration/test_canvas.py::test_group::test_nested_group_chord_counting_mixed"
  "t/integration/test_canvas.py::test_result_set::test_result_set"
  "t/integration/test_canvas.py::test_result_set::test_result_set_error"
  "t/integration/test_canvas.py::test_result_set::test_join_native_timeout_zero_returns_results_that_are_ready"
  "t/integration/test_tasks.py::test_tasks::test_revoked"
  "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_simple_canvas"
  "t/integration/test_tasks.py::test_tasks::test_expired"
  "t/integration/test_tasks.py::test_tasks::test_task_retried_once_with_expires"
  "t/integration/test_tasks.py::test_tasks::test_fail"
  "t/integration/test_inspect.py::test_Inspect::test_ping"
  "t/integration/test_inspect.py::test_Inspect::test_active_queues"
  "t/integration/test_inspect.py::test_Inspect::test_revoked"
  "t/integration/test_inspect.py::test_Inspect::test_stats"
)

# -- one stack --------------------------------------------------------------------------------
results="$root/.celery-suite/results"
mkdir -p "$results"
run_stack() {
  local stack=$1 work broker backend
  shift
  work=$(mktemp -d)
  mkdir -p "$work/data"
  case "$stack" in
    ours+*) broker="sqlite:///$work/data/media_store.db" ;;
    redis+*) broker="redis://127.0.0.1:6379/0" ;;
  esac
  case "$stack" in
    *+ours) backend="cl_tasks.results:ResultBackend" ;;
    *+redis) backend="redis://127.0.0.1:6379/0" ;;
  esac
  # A stack on Redis db 0 (the suite's own; the project's tests use dbs 1-15) waits for any
  # other run on it, and starts empty: nothing of an interrupted run leaks into it. On
  # ours+ours Redis is only the side channel of tests that skip themselves there.
  if [ "$stack" != ours+ours ]; then
    exec 9>/tmp/cl-tasks-celery-suite.lock
    flock 9
    .venv/bin/python -c 'import redis; redis.Redis(host="127.0.0.1", port=6379, db=0).flushdb()'
  fi
  local selection=("${files[@]}") options=() arg
  [ "$ci" = 0 ] || selection=("${ci_tests[@]}")
  # Tests named after `--` (t/integration/...) replace the selection; the rest go to pytest.
  local named=()
  for arg in "$@"; do
    case "$arg" in t/*) named+=("$arg") ;; *) options+=("$arg") ;; esac
  done
  [ "${#named[@]}" = 0 ] || selection=("${named[@]}")
  echo "== Celery $version integration suite on $stack (broker $broker, backend $backend)"
  # -p transports: registers our sqlite:// broker alias. Our backend reads DATABASE_URL, here the
  # media_store.db of CL_SERVER_DIR, the file the broker uses too. BROADCAST_TYPE=noop: the suite's
  # worker must not announce itself on the machine's MQTT broker.
  local status=0 junit_prefix=""
  [ "$ci" = 0 ] || junit_prefix="ci-"
  # .venv/bin on PATH: test_serialization runs the `celery` command.
  (cd "$suite" && env PATH="$root/.venv/bin:$PATH" TEST_BROKER="$broker" TEST_BACKEND="$backend" CL_SERVER_DIR="$work/data" \
    BROADCAST_TYPE=noop REDIS_HOST=127.0.0.1 REDIS_PORT=6379 \
    "$root/.venv/bin/python" -m pytest -p celery.contrib.pytest -p transports -p no:cacheprovider \
    --rootdir "$suite" -q -rfE --timeout 300 --junitxml "$results/$junit_prefix$stack.xml" \
    "${selection[@]}" ${options[@]+"${options[@]}"}) || status=$?
  rm -rf "$work"
  exec 9>&-
  return "$status"
}

failed=0
for stack in "${stacks[@]}"; do
  run_stack "$stack" "$@" || failed=1
done
if [ "$ci" = 1 ]; then
  exit "$failed"
fi
.venv/bin/python scripts/celery_suite_report.py "$version" "$results" docs/celery-suite.md "${stacks[@]}"
