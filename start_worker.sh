#!/usr/bin/env bash
# Start a cl_tasks worker the way the standalone compute worker's script did:
#   ./start_worker.sh --worker-id worker-1 --tasks image_resize,image_conversion [celery worker options]
# It sets up .venv on first use and runs `cl-tasks worker` (celery -A cl_tasks worker).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'USAGE'
usage: start_worker.sh [--worker-id ID] [--tasks a,b] [-- celery worker options]

  --worker-id ID   worker id (MQTT topic inference/workers/ID; node name ID@host)
  --tasks a,b      task types to run (default: every discovered compute module)
  -h, --help       this help
Everything after -- goes to `celery worker` (for example -- -c 4 --loglevel debug).
USAGE
}

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --worker-id) [ $# -ge 2 ] || { echo "start_worker.sh: --worker-id needs a value" >&2; exit 2; }
                 args+=(--worker-id "$2"); shift 2 ;;
    --worker-id=*) args+=(--worker-id "${1#*=}"); shift ;;
    --tasks) [ $# -ge 2 ] || { echo "start_worker.sh: --tasks needs a value" >&2; exit 2; }
             args+=(--tasks "$2"); shift 2 ;;
    --tasks=*) args+=(--tasks "${1#*=}"); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) echo "start_worker.sh: unknown option '$1' (options: --worker-id ID, --tasks a,b; pass celery options after --)" >&2
       exit 2 ;;
  esac
done

scripts/setup.sh
exec .venv/bin/cl-tasks worker "${args[@]}"
