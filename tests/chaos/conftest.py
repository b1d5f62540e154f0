"""Helpers of the chaos suite: SQL look-ups of the end state, a private Mosquitto, the ledger."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Worker
from tests.mqtt_support import PrivateMosquitto

#: The documented bound of the ``-wal`` file (README, "WAL upkeep").
WAL_BOUND = 16 * 1024 * 1024


def query(database: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Rows of one read-only statement on its own connection (waits for writers)."""
    conn = sqlite3.connect(database, timeout=60)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count(database: Path, sql: str, *params: object) -> int:
    return int(query(database, sql, *params)[0][0])  # type: ignore[call-overload]


def statuses(database: Path) -> Counter[str]:
    return Counter(
        {
            str(status): int(n)
            for status, n in query(database, "SELECT status, count(*) FROM jobs GROUP BY status")
        }
    )  # type: ignore[call-overload]


def ledger_runs(ledger: Path) -> Counter[str]:
    """Executions per job id: the ``ledger_echo`` runner appends one line per execution."""
    return Counter(ledger.read_text().split()) if ledger.exists() else Counter()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(every)


def broker_left(database: Path, queue: str) -> int:
    """Messages of ``queue`` still in the broker table (ack deletes them)."""
    return count(database, "SELECT count(*) FROM kombu_message WHERE queue = ?", queue)


def freeze(worker: Worker) -> None:
    """SIGSTOP the worker's process group: its pool stands still mid-whatever."""
    os.killpg(worker.process.pid, signal.SIGSTOP)


def thaw(worker: Worker) -> None:
    os.killpg(worker.process.pid, signal.SIGCONT)


def stop_all(workers: list[Worker]) -> None:
    """Warm shutdown of several workers at once (the fixture stops them one by one)."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """A running Mosquitto of this test's own, which it may restart."""
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    broker = PrivateMosquitto(folder)
    broker.start()
    yield broker
    broker.stop()
