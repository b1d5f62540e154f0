"""A busy database: another process holds SQLite's write lock for seconds mid-run."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support import (
    PYTHON,
    StartWorker,
    broker_left,
    insert_job,
    ledger_runs,
    query,
    run_client,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.chaos

TASK = "ledger_echo"
#: Seconds the other process holds the write lock (well under busy_timeout, 60 s).
LOCK_SECONDS = 6.0
#: A job of one second, reporting progress four times (so it writes while the lock is held).
SLOW = {"ledger_path": "ledger.txt", "steps": 4, "seconds": 0.25}

LOCKER = f"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN IMMEDIATE")
print("locked", time.time(), flush=True)
time.sleep({LOCK_SECONDS})  # the scenario: the write lock held this long
conn.execute("COMMIT")
print("released", time.time(), flush=True)
"""

CLIENT = f"""
import json, cl_tasks
ids = [cl_tasks.submit_job("{TASK}", dict({SLOW!r}, echo=n)).id for n in range(5)]
print(json.dumps(ids))
"""


def test_workers_wait_out_a_held_write_lock_and_carry_on(
    server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    database = server_dir / "media_store.db"
    # Leases longer than the lock, as in production (30 s and 60 s against a few seconds).
    env = {
        **jobs_env,
        "BROADCAST_TYPE": "noop",
        "JOB_LEASE_SECONDS": "10",
        "BROKER_VISIBILITY_TIMEOUT": "12",
        "CELERY_BROKER_URL": f"sqlite:///{database}?visibility_timeout=12&polling_interval=0.5",
    }
    worker = start_worker(env, "-Q", TASK, "-c", "2")
    # Given a worker in the middle of a run of one-second jobs
    for n in range(8):
        insert_job(database, f"before-{n}", TASK, dict(SLOW, echo=n))
    wait_until(lambda: statuses(database)["processing"] == 2, 60, "two jobs running")
    # When another process holds the write lock for six seconds
    locker = subprocess.Popen([PYTHON, "-c", LOCKER, str(database)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None
    assert locker.stdout.readline().startswith("locked")
    running = {
        row["job_id"] for row in query(database, "SELECT job_id FROM jobs WHERE status = 'processing'")
    }
    # And meanwhile the API inserts rows and a Celery client submits jobs (both wait for the lock)
    inserter = threading.Thread(
        target=lambda: [insert_job(database, f"during-{n}", TASK, dict(SLOW, echo=n)) for n in range(5)]
    )
    inserter.start()
    submitted: list[str] = []
    client = threading.Thread(target=lambda: submitted.extend(json.loads(run_client(env, CLIENT))))
    client.start()
    assert locker.stdout.readline().startswith("released")
    assert locker.wait(timeout=30) == 0
    inserter.join(timeout=60)
    client.join(timeout=120)
    # Then every job completes, exactly once, and none ends in error
    job_ids = {f"before-{n}" for n in range(8)} | {f"during-{n}" for n in range(5)} | set(submitted)
    assert len(job_ids) == 18
    wait_until(
        lambda: statuses(database)["completed"] + statuses(database)["error"] == 18, 120, "every job ended"
    )
    rows = query(database, "SELECT job_id, status, error_message FROM jobs")
    assert {row["job_id"] for row in rows} == job_ids
    assert [row for row in rows if row["status"] != "completed" or row["error_message"] is not None] == []
    runs = ledger_runs(server_dir / "ledger.txt")
    assert set(runs) == job_ids and max(runs.values()) == 1, runs
    # And the jobs that were running when the lock was taken were among them
    assert running and running <= job_ids
    # And the worker lives on, never reporting the lock as an error
    assert worker.process.poll() is None
    log = worker.text()
    assert "database is locked" not in log
    assert [line for line in log.splitlines() if "ERROR/" in line or "CRITICAL/" in line] == []
    wait_until(lambda: broker_left(database, TASK) == 0, 30, "every message acked")
