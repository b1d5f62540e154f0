"""The ``cl-tasks`` command.

* ``cl-tasks worker [--worker-id ID] [--tasks a,b] [celery worker options]`` runs
  ``celery -A cl_tasks worker``: node name ``ID@<host>`` and ``WORKER_ID=ID``
  (the MQTT topic), queues = the task types asked for (default: every
  discovered one), ``-l $LOG_LEVEL`` unless a log level is given.
* ``cl-tasks submit TASK key=value … [--priority N] [--wait]`` submits a job;
  with ``--wait`` follows it with a progress bar and prints its output. A value
  is JSON when it parses as JSON (``width=64``, ``keep=true``,
  ``input_paths='["a.jpg"]'``), else a string; for ``*_paths`` keys a plain value
  is a comma-separated list (``input_paths=a.jpg,b.jpg``).
* ``cl-tasks jobs [--status S] [--limit N]``, ``cl-tasks job ID``: the jobs table.
* ``cl-tasks queues``: each task type's queue depth and ``jobs`` backlog.
* ``cl-tasks cleanup-mqtt PATTERN [BROKER] [PORT]`` clears retained MQTT messages.

Every command takes ``--json`` for scripts (except ``worker``). Errors are one
line on stderr with exit code 2; a job that ends ``error`` under ``--wait``
exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from cl_tasks.app import app
from cl_tasks.jobs import job_store
from cl_tasks.modules import discover
from cl_tasks.mqtt import clear_retained
from cl_tasks.queues import queue_depths
from cl_tasks.settings import Settings, SettingsError, check_topic_level, current
from cl_tasks.tasks import submit_job
from cl_tasks.terminal import Terminal

#: Seconds between looks at a job followed with ``submit --wait``.
FOLLOW_EVERY = 0.2


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-tasks", description="Run and operate cl_tasks workers and jobs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = commands.add_parser(
        "worker",
        help="start a worker (celery -A cl_tasks worker)",
        description="Start `celery -A cl_tasks worker`. Options not listed here go to celery worker"
        " (for example -c 4, -P solo, --loglevel debug).",
    )
    worker.add_argument("--worker-id", help="worker id: MQTT topic level and node name ID@host")
    worker.add_argument(
        "--tasks", "--queues", "-Q", dest="tasks", help="comma-separated task types (default: all discovered)"
    )
    submit = commands.add_parser(
        "submit",
        help="submit a job",
        description="Submit a job. A value is JSON when it parses as JSON (width=64, keep=true,"
        " input_paths='[\"a.jpg\"]'), else a string; for *_paths keys a plain value is a"
        " comma-separated list (input_paths=a.jpg,b.jpg). Relative paths are inside CL_SERVER_DIR.",
    )
    submit.add_argument("task", help="task type, e.g. image_resize")
    submit.add_argument("params", nargs="*", metavar="key=value", help="job parameters")
    submit.add_argument(
        "--priority", type=int, choices=range(11), metavar="0-10", help="10 runs first (default 5)"
    )
    submit.add_argument("--wait", action="store_true", help="follow the job to its end and print its output")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait (3600)")
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--status", choices=("queued", "processing", "completed", "error"))
    jobs.add_argument("--limit", type=int, default=20, help="rows to show (20)")
    job = commands.add_parser("job", help="show one job")
    job.add_argument("job_id")
    commands.add_parser("queues", help="queue depth and jobs backlog per task type")
    cleanup = commands.add_parser(
        "cleanup-mqtt",
        help="clear retained MQTT messages under a topic pattern",
        description="Clear every retained message whose topic matches PATTERN (MQTT wildcards allowed).",
    )
    cleanup.add_argument("pattern", help="topic pattern, e.g. 'inference/workers/#'")
    cleanup.add_argument("broker", nargs="?", help="broker host (default: MQTT_BROKER)")
    cleanup.add_argument("port", nargs="?", type=int, help="broker port (default: MQTT_PORT)")
    for sub in (submit, jobs, job, commands.choices["queues"], cleanup):
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _worker(settings: Settings, args: argparse.Namespace, rest: Sequence[str]) -> int:
    command = [sys.executable, "-m", "celery", "-A", "cl_tasks", "worker"]
    if args.worker_id:
        check_topic_level(args.worker_id, "--worker-id")
        os.environ["WORKER_ID"] = args.worker_id
        command += ["-n", f"{args.worker_id}@%h"]
    tasks = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if not tasks:
        tasks = sorted(_task_types(settings))
    if not tasks:
        raise CommandError(f"no compute modules found in {settings.modules_dir}; set COMPUTE_MODULES_DIR")
    command += ["-Q", ",".join(tasks)]
    if not any(arg in ("-l", "--loglevel") or arg.startswith("--loglevel=") for arg in rest):
        command += ["-l", settings.log_level]
    os.execv(sys.executable, [*command, *rest])
    return 0  # pragma: no cover - execv does not return


def _task_types(settings: Settings) -> dict[str, Any]:
    return dict(discover(settings.modules_dir, settings.supported_tasks))


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words as job params (see the module docstring)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or not key.isidentifier():
            raise CommandError(f"bad parameter {pair!r}: write key=value, e.g. width=64")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw.split(",") if key.endswith("_paths") else raw
        if key.endswith("_paths") and isinstance(value, str):
            value = value.split(",")
        params[key] = value
    return params


def _check_database(settings: Settings) -> None:
    path = settings.sqlite_path
    if path is not None and not path.exists():
        raise CommandError(
            f"no database at {path}; start a worker (scripts/worker.sh) or set CL_SERVER_DIR / DATABASE_URL"
        )


def _submit(settings: Settings, args: argparse.Namespace, out: Terminal) -> int:
    known = _task_types(settings)
    if args.task not in known:
        raise CommandError(f"unknown task type {args.task!r}; known: {', '.join(sorted(known)) or 'none'}")
    params = parse_params(args.params)
    job_id = submit_job(args.task, params, priority=args.priority).id
    if not args.wait:
        out.line(json.dumps({"job_id": job_id}) if args.json else job_id)
        return 0
    if not args.json:
        out.line(f"job {job_id} submitted ({args.task})")
    row = _follow(job_id, args.timeout, None if args.json else out)
    if args.json:
        out.line(json.dumps(_job_dict(row)))
    elif row.status == "completed":
        out.line(json.dumps(row.output(), indent=2))
    else:
        print(f"cl-tasks: job {job_id} failed: {row.error_message}", file=sys.stderr)
    return 0 if row.status == "completed" else 1


def _follow(job_id: str, timeout: float, out: Terminal | None) -> Any:
    store = job_store()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.get(job_id)
        if row is not None and out is not None:
            out.progress(float(row.progress), row.status)
        if row is not None and row.status in ("completed", "error"):
            if out is not None:
                out.end_progress()
            return row
        time.sleep(FOLLOW_EVERY)
    raise CommandError(f"job {job_id} did not end within {timeout:g} s; see `cl-tasks job {job_id}`")


def _job_dict(row: Any) -> dict[str, Any]:
    data = asdict(row)
    data["params"] = _maybe_json(row.params)
    data["task_output"] = _maybe_json(row.task_output)
    return data


def _maybe_json(text: str | None) -> Any:
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return text


def _when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _jobs(settings: Settings, args: argparse.Namespace, out: Terminal) -> int:
    _check_database(settings)
    rows = job_store().recent(status=args.status, limit=args.limit)
    if args.json:
        out.line(json.dumps([_job_dict(row) for row in rows]))
        return 0
    out.table(
        ["JOB ID", "TASK TYPE", "STATUS", "PROGRESS", "CREATED (UTC)", "ERROR"],
        [
            [
                row.job_id,
                row.task_type,
                out.status(row.status),
                f"{row.progress}%",
                _when(row.created_at),
                (row.error_message or "")[:60],
            ]
            for row in rows
        ],
    )
    return 0


def _job(settings: Settings, args: argparse.Namespace, out: Terminal) -> int:
    _check_database(settings)
    row = job_store().get(args.job_id)
    if row is None:
        raise CommandError(f"no job {args.job_id!r}; `cl-tasks jobs` lists them")
    data = _job_dict(row)
    if args.json:
        out.line(json.dumps(data))
        return 0
    for key, value in data.items():
        out.line(f"{key:>14}  {_shown(key, value, out)}")
    return 0


def _shown(key: str, value: Any, out: Terminal) -> str:
    if key.endswith("_at"):
        return _when(value)
    if key == "status":
        return out.status(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _queues(settings: Settings, args: argparse.Namespace, out: Terminal) -> int:
    _check_database(settings)
    backlog = job_store().backlog()
    types = sorted(set(_task_types(settings)) | set(backlog))
    # The app's connection: celeryconfig.py's broker_url and transport options count.
    with app.connection_for_read() as conn:
        depths = queue_depths(conn, types)
    rows = [(name, depths[name], backlog.get(name, 0)) for name in types]
    if args.json:
        out.line(json.dumps([{"task_type": n, "messages": m, "queued_jobs": q} for n, m, q in rows]))
        return 0
    out.table(["TASK TYPE", "MESSAGES", "QUEUED JOBS"], [[n, str(m), str(q)] for n, m, q in rows])
    return 0


def _cleanup_mqtt(settings: Settings, args: argparse.Namespace, out: Terminal) -> int:
    mqtt = replace(
        settings.mqtt, host=args.broker or settings.mqtt.host, port=args.port or settings.mqtt.port
    )
    try:
        cleared = clear_retained(mqtt, args.pattern)
    except OSError as exc:
        raise CommandError(f"cannot reach the MQTT broker {mqtt.host}:{mqtt.port}: {exc}") from exc
    if args.json:
        out.line(json.dumps({"cleared": cleared}))
        return 0
    for topic in cleared:
        out.line(f"cleared {topic}")
    out.line(f"{len(cleared)} retained message(s) cleared under {args.pattern}")
    return 0


COMMANDS = {"submit": _submit, "jobs": _jobs, "job": _job, "queues": _queues, "cleanup-mqtt": _cleanup_mqtt}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cl-tasks``."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "worker" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        settings = current()
        if args.command == "worker":
            return _worker(settings, args, rest)
        return COMMANDS[args.command](settings, args, Terminal())
    except (CommandError, SettingsError) as exc:
        print(f"cl-tasks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
