"""A Celery app for the result backend tests: ``celery -A apps.canvas_tasks worker``.

Broker ``TEST_BROKER_URL`` (our SQLite transport); result backend ours,
``cl_tasks.results:ResultBackend``, on ``DATABASE_URL`` (SQLite or PostgreSQL);
``TEST_LEDGER`` is a folder where ``record`` notes that a callback or errback ran.
The tasks are the few Celery's own canvas suite uses (add, tsum, fail, identity, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery, Task, chain

import transports  # noqa: F401 - registers sqlite://

app = Celery("canvas_tasks")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER_URL", "sqlite:///canvas.db"),
    result_backend="cl_tasks.results:ResultBackend",
    broker_transport_options={"polling_interval": 0.5},
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_extended=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


class ExpectedError(Exception):
    """Raised by :func:`fail` (a header or chain step that fails on purpose)."""


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def tsum(numbers: list[int]) -> int:
    return sum(numbers)


@app.task
def identity(value: Any) -> Any:
    return value


@app.task
def fail(*_: Any) -> None:
    raise ExpectedError("fails on purpose")


@app.task
def record(*args: Any, key: str) -> str:
    """Append ``key`` to the ledger (a callback or errback ran)."""
    with (Path(os.environ["TEST_LEDGER"]) / "ledger").open("a") as ledger:
        ledger.write(f"{key}\n")
    return key


@app.task(bind=True)
def add_to_own_chord(self: Task, x: int, extra: int) -> int:
    """A header part that adds one more part (``add.si(extra, 0)``) to its chord."""
    self.add_to_chord(add.si(extra, 0))
    return x


@app.task(bind=True)
def replace_with_chain(self: Task, x: int) -> Any:
    """A header part replaced by ``add(x, 1) | add(10)``."""
    raise self.replace(chain(add.si(x, 1), add.s(10)))
