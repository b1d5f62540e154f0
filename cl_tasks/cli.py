"""The ``cl-tasks`` command.

* ``cl-tasks worker [--worker-id ID] [--tasks a,b] [celery worker options]`` runs
  ``celery -A cl_tasks worker``: node name ``ID@<host>`` and ``WORKER_ID=ID``
  (the MQTT topic), queues = the task types asked for (default: every
  discovered one), ``-l $LOG_LEVEL`` unless a log level is given.
* ``cl-tasks cleanup-mqtt PATTERN [BROKER] [PORT]`` clears the retained MQTT
  messages under a topic pattern (``MQTT_*`` variables give auth and TLS).

Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from cl_tasks.settings import SettingsError, check_topic_level, load


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cl-tasks", description="Run and operate cl_tasks workers.")
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
    cleanup = commands.add_parser(
        "cleanup-mqtt",
        help="clear retained MQTT messages under a topic pattern",
        description="Clear every retained message whose topic matches PATTERN (MQTT wildcards allowed).",
    )
    cleanup.add_argument("pattern", help="topic pattern, e.g. 'inference/workers/#'")
    cleanup.add_argument("broker", nargs="?", help="broker host (default: MQTT_BROKER)")
    cleanup.add_argument("port", nargs="?", type=int, help="broker port (default: MQTT_PORT)")
    return parser


def _worker(args: argparse.Namespace, rest: Sequence[str]) -> int:
    settings = load()
    command = [sys.executable, "-m", "celery", "-A", "cl_tasks", "worker"]
    if args.worker_id:
        check_topic_level(args.worker_id, "--worker-id")
        os.environ["WORKER_ID"] = args.worker_id
        command += ["-n", f"{args.worker_id}@%h"]
    tasks = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if not tasks:
        from cl_tasks.modules import discover

        tasks = sorted(discover(settings.modules_dir, settings.supported_tasks))
    if not tasks:
        raise CommandError(f"no compute modules found in {settings.modules_dir}; set COMPUTE_MODULES_DIR")
    command += ["-Q", ",".join(tasks)]
    if not any(arg in ("-l", "--loglevel") or arg.startswith("--loglevel=") for arg in rest):
        command += ["-l", settings.log_level]
    os.execv(sys.executable, [*command, *rest])
    return 0  # pragma: no cover - execv does not return


def _cleanup_mqtt(args: argparse.Namespace) -> int:
    from cl_tasks.mqtt import clear_retained

    mqtt = load().mqtt
    mqtt = replace(mqtt, host=args.broker or mqtt.host, port=args.port or mqtt.port)
    try:
        cleared = clear_retained(mqtt, args.pattern)
    except OSError as exc:
        raise CommandError(f"cannot reach the MQTT broker {mqtt.host}:{mqtt.port}: {exc}") from exc
    for topic in cleared:
        print(f"cleared {topic}")
    print(f"{len(cleared)} retained message(s) cleared under {args.pattern}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cl-tasks``."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "worker":
            return _worker(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _cleanup_mqtt(args)
    except (CommandError, SettingsError) as exc:
        print(f"cl-tasks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
