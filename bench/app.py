"""The Celery app the benchmarks run: one no-op task, the same settings on every broker.

``BENCH_BROKER`` selects the broker; ``BENCH_LOG`` is a file each task start
appends one line to (``<epoch seconds> <sent epoch seconds>``), so the harness
can time drains and wake-ups from outside without a result backend.
"""

from __future__ import annotations

import os
import time

from celery import Celery, signals

import transports  # noqa: F401 - registers sqlite://

app = Celery("bench")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER", "memory://"),
    broker_transport_options=dict(
        item.split("=", 1) for item in os.environ.get("BENCH_TRANSPORT_OPTIONS", "").split(";") if item
    ),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
)
_log_fd: list[int] = []


@app.task(name="bench.noop")
def noop(sent: float = 0.0) -> None:
    """Does nothing; its start is recorded by the task_prerun handler."""


@signals.task_prerun.connect
def _record_start(
    task: object = None, args: object = None, kwargs: dict[str, float] | None = None, **_: object
) -> None:
    path = os.environ.get("BENCH_LOG")
    if not path:
        return
    if not _log_fd or _log_fd[0] < 0:
        _log_fd[:] = [os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)]
    sent = (kwargs or {}).get("sent", 0.0)
    os.write(_log_fd[0], f"{time.time():.6f} {sent:.6f}\n".encode())


@signals.worker_process_init.connect
def _reset_log(**_: object) -> None:
    _log_fd[:] = []
