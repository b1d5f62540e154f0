"""The ``cl-tasks`` command (grows with the operations issue); today: ``worker``.

``cl-tasks worker`` runs ``celery -A cl_tasks worker`` with ``-l $LOG_LEVEL``
unless a log level is given, plus the node name and queues asked for.
"""

from __future__ import annotations

import argparse
import os
import sys

from cl_tasks.settings import load


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cl-tasks``."""
    parser = argparse.ArgumentParser(prog="cl-tasks", description="Run and operate cl_tasks workers.")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser(
        "worker",
        help="start a Celery worker on the configured broker",
        description="Start `celery -A cl_tasks worker`; unknown options are passed to celery.",
    )
    worker.add_argument("--worker-id", help="node name of the worker (default: celery's)")
    worker.add_argument("--queues", "-Q", help="comma-separated queues to consume")
    args, rest = parser.parse_known_args(argv)
    command = [sys.executable, "-m", "celery", "-A", "cl_tasks", "worker"]
    if args.worker_id:
        command += ["-n", f"{args.worker_id}@%h"]
    if args.queues:
        command += ["-Q", args.queues]
    if not any(arg in ("-l", "--loglevel") or arg.startswith("--loglevel=") for arg in rest):
        command += ["-l", load().log_level]
    os.execv(sys.executable, command + rest)
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
