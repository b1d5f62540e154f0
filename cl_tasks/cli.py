"""The ``cl-tasks`` command, built on click (Celery's own CLI library) with rich output.

* ``cl-tasks worker [--worker-id ID] [--tasks a,b] [celery worker options]`` runs
  ``celery -A cl_tasks worker``: node name ``ID@<host>`` and ``WORKER_ID=ID``
  (the MQTT topic), queues = the task types asked for (default: every
  discovered one), ``-l $LOG_LEVEL`` unless a log level is given.
* ``cl-tasks submit TASK key=value … [--priority N] [--wait]`` submits a job;
  with ``--wait`` follows it with a progress bar (elapsed time, time left) and
  prints its output. A value is JSON when it parses as JSON (``width=64``,
  ``keep=true``, ``input_paths='["a.jpg"]'``), else a string; for ``*_paths``
  keys a plain value is a comma-separated list (``input_paths=a.jpg,b.jpg``).
  Ctrl-C stops following, not the job: it says so and how to follow it (exit 130).
* ``cl-tasks jobs [--status S] [--limit N]``, ``cl-tasks job ID``: the jobs table.
* ``cl-tasks queues``: each task type's queue depth and ``jobs`` backlog.
* ``cl-tasks cleanup-mqtt PATTERN [BROKER] [PORT]`` clears retained MQTT messages.

``cl-tasks`` alone prints its help, ``--version`` its version; click's shell
completion works (``eval "$(_CL_TASKS_COMPLETE=bash_source cl-tasks)"``). Every
command takes ``--json`` for scripts (except ``worker``). Help never reads the
settings, so it works whatever the environment holds. Errors (a bad setting, a
bad option, an unknown job) are one line on stderr, ``cl-tasks: error: …``, with
exit code 2; a job that ends ``error`` under ``--wait`` exits 1; a reader that
goes away (``| head -1``) ends the command quietly (exit 1: rich's handling for
tables, click's for plain lines).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

import click
from kombu.exceptions import OperationalError as BrokerError
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from cl_tasks.app import app
from cl_tasks.jobs import JobRowError, job_store
from cl_tasks.jobs_table import JobsTableError, JobsTableMissing
from cl_tasks.messages import JobParamsTooLarge
from cl_tasks.modules import discover
from cl_tasks.mqtt import clear_retained
from cl_tasks.queues import queue_depths
from cl_tasks.settings import ERROR_PREFIX, Settings, check_topic_level, current
from cl_tasks.tasks import submit_job
from cl_tasks.terminal import ProgressUpdate, Terminal

#: Seconds between looks at a job followed with ``submit --wait``.
FOLLOW_EVERY = 0.2
#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: Job statuses ``cl-tasks jobs --status`` takes.
STATUSES = ("queued", "processing", "completed", "error")


#: Errors of what cl-tasks works with, each shown as one line (not a traceback), exit code 2.
WORLD_ERRORS = (JobsTableError, JobRowError, JobParamsTooLarge, SQLAlchemyError, BrokerError, OSError)


class CommandError(click.ClickException):
    """A user error: printed as one line, exit code 2."""

    exit_code = 2


def _usage(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """Help starts ``usage: cl-tasks …`` (lower case, as before: scripts and tests read it)."""
    pieces = command.collect_usage_pieces(ctx)
    formatter.write_usage(ctx.command_path, " ".join(pieces), prefix="usage: ")


class _Command(click.Command):
    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _usage(self, ctx, formatter)


class _Group(click.Group):
    command_class = _Command

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _usage(self, ctx, formatter)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(
    cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="cl_tasks", prog_name="cl-tasks")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run and operate cl_tasks workers and jobs."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    short_help="Start a worker (celery -A cl_tasks worker).",
)
@click.option("--worker-id", help="Worker id: MQTT topic level and node name ID@host.")
@click.option(
    "--tasks", "--queues", "-Q", "tasks", help="Comma-separated task types (default: all discovered)."
)
@click.argument("celery_options", nargs=-1, type=click.UNPROCESSED)
def worker(worker_id: str | None, tasks: str | None, celery_options: tuple[str, ...]) -> int:
    """Start `celery -A cl_tasks worker`. Options not listed here go to celery worker
    (for example -c 4, -P solo, --loglevel debug)."""
    settings = current()
    command = [sys.executable, "-m", "celery", "-A", "cl_tasks", "worker"]
    if worker_id:
        check_topic_level(worker_id, "--worker-id")
        os.environ["WORKER_ID"] = worker_id
        command += ["-n", f"{worker_id}@%h"]
    queues = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if not queues:
        queues = sorted(_task_types(settings))
    if not queues:
        raise CommandError(f"no compute modules found in {settings.modules_dir}; set COMPUTE_MODULES_DIR")
    command += ["-Q", ",".join(queues)]
    rest = list(celery_options)
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


@cli.command(short_help="Submit a job.")
@click.argument("task")
@click.argument("params", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--priority", type=click.IntRange(0, 10), metavar="0-10", help="10 runs first (default 5).")
@click.option("--wait", is_flag=True, help="Follow the job to its end and print its output.")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait with --wait.")
@json_option
def submit(
    task: str, params: tuple[str, ...], priority: int | None, wait: bool, timeout: float, as_json: bool
) -> int:
    """Submit a job. A value is JSON when it parses as JSON (width=64, keep=true,
    input_paths='["a.jpg"]'), else a string; for *_paths keys a plain value is a
    comma-separated list (input_paths=a.jpg,b.jpg). Relative paths are inside CL_SERVER_DIR."""
    known = _task_types(current())
    if task not in known:
        raise CommandError(f"unknown task type {task!r}; known: {', '.join(sorted(known)) or 'none'}")
    job_id = submit_job(task, parse_params(params), priority=priority).id
    out = Terminal()
    if not wait:
        out.line(json.dumps({"job_id": job_id}) if as_json else job_id)
        return 0
    if not as_json:
        out.line(f"job {job_id} submitted ({task})")
    try:
        if as_json:
            row = _follow(job_id, timeout, lambda _percent, _status: None)
        else:
            with out.progress(task) as update:
                row = _follow(job_id, timeout, update)
    except KeyboardInterrupt:
        _error(
            f"stopped following job {job_id}; the job goes on (Ctrl-C does not cancel it):"
            f" `cl-tasks job {job_id}` shows it, `cl-tasks jobs` lists them"
        )
        return EXIT_INTERRUPTED
    if as_json:
        out.line(json.dumps(_job_dict(row)))
    elif row.status == "completed":
        out.line(json.dumps(row.output(), indent=2))
    else:
        print(f"cl-tasks: job {job_id} failed: {row.error_message}", file=sys.stderr)
    return 0 if row.status == "completed" else 1


def _follow(job_id: str, timeout: float, update: ProgressUpdate) -> Any:
    """Poll ``job_id``'s row until it ends; Ctrl-C raises KeyboardInterrupt between two looks.

    Ctrl-C only sets a flag: a KeyboardInterrupt raised anywhere (inside SQLAlchemy's
    pool or the database driver, holding one of their locks) could leave the process
    unable to exit; between two looks nothing is held.
    """
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    try:
        store = job_store()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not interrupted:
            row = store.get(job_id)
            if row is not None:
                update(float(row.progress), row.status)
            if row is not None and row.status in ("completed", "error"):
                return row
            time.sleep(FOLLOW_EVERY)  # a signal ends no sleep early (PEP 475): <= 0.2 s to notice
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
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


@cli.command(short_help="List jobs, newest first.")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Rows to show.")
@json_option
def jobs(status: str | None, limit: int, as_json: bool) -> int:
    """List jobs, newest first."""
    _check_database(current())
    rows = job_store().recent(status=status, limit=limit)
    out = Terminal()
    if as_json:
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


@cli.command(short_help="Show one job.")
@click.argument("job_id")
@json_option
def job(job_id: str, as_json: bool) -> int:
    """Show one job: every column of its row."""
    _check_database(current())
    row = job_store().get(job_id)
    if row is None:
        raise CommandError(f"no job {job_id!r}; `cl-tasks jobs` lists them")
    data = _job_dict(row)
    out = Terminal()
    if as_json:
        out.line(json.dumps(data))
        return 0
    out.fields([(key, _shown(key, value, out)) for key, value in data.items()])
    return 0


def _shown(key: str, value: Any, out: Terminal) -> str | Text:
    if key.endswith("_at"):
        return _when(value)
    if key == "status":
        return out.status(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


@cli.command(short_help="Queue depth and jobs backlog per task type.")
@json_option
def queues(as_json: bool) -> int:
    """Queue depth (broker messages) and jobs backlog (queued rows) per task type."""
    settings = current()
    _check_database(settings)
    backlog = job_store().backlog()
    types = sorted(set(_task_types(settings)) | set(backlog))
    # The app's connection: celeryconfig.py's broker_url and transport options count.
    with app.connection_for_read() as conn:
        depths = queue_depths(conn, types)
    rows = [(name, depths[name], backlog.get(name, 0)) for name in types]
    out = Terminal()
    if as_json:
        out.line(json.dumps([{"task_type": n, "messages": m, "queued_jobs": q} for n, m, q in rows]))
        return 0
    out.table(["TASK TYPE", "MESSAGES", "QUEUED JOBS"], [[n, str(m), str(q)] for n, m, q in rows])
    return 0


@cli.command("cleanup-mqtt", short_help="Clear retained MQTT messages under a topic pattern.")
@click.argument("pattern")
@click.argument("broker", required=False)
@click.argument("port", required=False, type=click.IntRange(1, 65535))
@json_option
def cleanup_mqtt(pattern: str, broker: str | None, port: int | None, as_json: bool) -> int:
    """Clear every retained message whose topic matches PATTERN (MQTT wildcards allowed,
    e.g. 'inference/workers/#'). BROKER and PORT default to MQTT_BROKER and MQTT_PORT."""
    settings = current().mqtt
    mqtt = replace(settings, host=broker or settings.host, port=port or settings.port)
    try:
        cleared = clear_retained(mqtt, pattern)
    except OSError as exc:
        raise CommandError(f"cannot reach the MQTT broker {mqtt.host}:{mqtt.port}: {exc}") from exc
    out = Terminal()
    if as_json:
        out.line(json.dumps({"cleared": cleared}))
        return 0
    for topic in cleared:
        out.line(f"cleared {topic}")
    out.line(f"{len(cleared)} retained message(s) cleared under {pattern}")
    return 0


def _error(message: str) -> None:
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)


def _usage_hint(exc: click.ClickException) -> str:
    context = getattr(exc, "ctx", None)
    return f" (see `{context.command_path} --help`)" if isinstance(exc, click.UsageError) and context else ""


def _world_error(exc: BaseException) -> str:
    """One line for a database, broker or file error: its first line, with what to do if known."""
    if isinstance(exc, JobsTableMissing):
        return f"{exc}; the API service creates it, or the first job submitted (`cl-tasks submit`)"
    detail = getattr(exc, "orig", None) or exc  # SQLAlchemy's wrapper: the driver's own message
    first = (str(detail).strip().splitlines() or [type(detail).__name__])[0]
    if isinstance(exc, SQLAlchemyError):
        return f"the jobs database ({current().database_url.split('@')[-1]}) failed: {first}"
    if isinstance(exc, BrokerError):
        return f"the broker ({current().broker_url.split('@')[-1]}) failed: {first}"
    return first


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cl-tasks``: the exit code (0 ok, 1 job failed, 2 user error, 130 Ctrl-C)."""
    try:
        result = cli.main(
            args=None if argv is None else list(argv), prog_name="cl-tasks", standalone_mode=False
        )
    except click.ClickException as exc:  # SettingsError, CommandError, click's usage errors
        _error(exc.format_message().rstrip(".") + _usage_hint(exc))
        return exc.exit_code
    except click.Abort:  # Ctrl-C outside `submit --wait`
        return EXIT_INTERRUPTED
    except WORLD_ERRORS as exc:
        _error(_world_error(exc))
        return CommandError.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
