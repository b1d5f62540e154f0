"""A small Celery app for transport tests: ``celery -A apps.sample_tasks worker``.

The broker and result backend come from ``TEST_BROKER_URL`` / ``TEST_RESULT_BACKEND``
(test processes set them); ``TEST_LEDGER`` is a folder where tasks record runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery

import transports  # noqa: F401 - registers sqlite://

app = Celery("sample_tasks")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER_URL", "sqlite:///sample.db"),
    result_backend=os.environ.get("TEST_RESULT_BACKEND", "db+sqlite:///sample.db"),
    database_engine_options={"connect_args": {"timeout": 60}},
    broker_transport_options={"polling_interval": 0.5},
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


def _ledger(name: str) -> Path:
    return Path(os.environ["TEST_LEDGER"]) / name


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True, max_retries=3)
def flaky(self, key: str) -> int:  # type: ignore[no-untyped-def]
    """Fails on the first run, succeeds on the retry; returns the attempt count."""
    marker = _ledger(f"flaky-{key}")
    with marker.open("a") as ledger:
        ledger.write("run\n")
    attempts = len(marker.read_text().splitlines())
    if attempts < 2:
        raise self.retry(countdown=1)
    return attempts


@app.task
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task
def record(key: str) -> str:
    with _ledger("runs").open("a") as ledger:
        ledger.write(f"{key}\n")
    return key
