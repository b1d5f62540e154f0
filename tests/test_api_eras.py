"""A real worker on the API's exact table of each era, Celery-side submits, retries and priority 10."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from api_schema import api_row, create_sqlite, insert_sqlite

from tests.support import StartWorker, compute_env, run_client, wait_for_job

SUBMIT = """
from cl_tasks import submit_job
from cl_tasks.jobs import JobRowError
try:
    print(submit_job("ledger_echo", {{"ledger_path": "l.txt"}}, priority=7).get(timeout=60))
except JobRowError as exc:
    print("refused:", exc)
"""


def era_env(tmp_path: Path, era: str) -> tuple[dict[str, str], Path]:
    """A CL_SERVER_DIR with the era's table: era C in a ``compute.db`` (upstream's current file)."""
    data = tmp_path / "data"
    data.mkdir()
    db = data / ("compute.db" if era == "c" else "media_store.db")
    create_sqlite(db, era)
    broker = f"sqlite:///{db}?visibility_timeout=4&polling_interval=0.5"
    env = compute_env(data, CELERY_BROKER_URL=broker, DATABASE_URL=f"sqlite:///{db}", BROADCAST_TYPE="noop")
    return env, db


@pytest.mark.parametrize("era", ["a", "c"])
def test_api_rows_and_celery_submits_on_the_era(tmp_path: Path, start_worker: StartWorker, era: str) -> None:
    env, db = era_env(tmp_path, era)
    start_worker(env, "-Q", "ledger_echo", "-c", "1")
    # An API row runs
    insert_sqlite(db, api_row("api-1", "ledger_echo", {"ledger_path": "l.txt"}, era))
    assert wait_for_job(db, "api-1")["status"] == "completed"
    # A Celery-side job creates a row the era's NOT NULL columns accept, and completes
    assert "{'echo': None}" in run_client(env, SUBMIT.format())
    conn = sqlite3.connect(db)
    row = conn.execute("SELECT status, retry_count, max_retries FROM jobs WHERE job_id != 'api-1'").fetchone()
    assert row == ("completed", 0, 3)
    # And a row the database refuses raises from the client, with the database's reason
    conn.execute(
        "CREATE TRIGGER closed BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'intake closed'); END"
    )
    conn.commit()
    conn.close()
    out = run_client(env, SUBMIT.format())
    assert out.startswith("refused:") and "intake closed" in out


def test_a_killed_runner_is_retried_and_bad_input_is_not(tmp_path: Path, start_worker: StartWorker) -> None:
    env, db = era_env(tmp_path, "a")
    start_worker(env, "-Q", "misbehave,ledger_echo", "-c", "1")
    insert_sqlite(db, api_row("crash", "misbehave", {"mode": "crash"}, "a", max_retries=2))
    # (a path outside CL_SERVER_DIR: the job's input is wrong, trying again cannot help)
    insert_sqlite(db, api_row("bad", "ledger_echo", {"ledger_path": "/etc/cl-tasks-ledger"}, "a"))
    crashed = wait_for_job(db, "crash")
    assert crashed["status"] == "error" and crashed["retry_count"] == 2, crashed
    assert "attempt 3; max_retries=2" in crashed["error_message"]
    bad = wait_for_job(db, "bad")
    assert bad["status"] == "error" and bad["retry_count"] == 0, bad


PRIORITIES = """
from cl_tasks import submit_job
for name, priority in (("nine", 9), ("ten", 10), ("five", 5)):
    submit_job("ledger_echo", {"ledger_path": "p.txt"}, priority=priority).id
"""


def test_priority_10_runs_before_9(tmp_path: Path, start_worker: StartWorker) -> None:
    env, db = era_env(tmp_path, "b")
    # Given three jobs waiting in the broker before any worker runs
    run_client(env, PRIORITIES)
    # When one process takes them one at a time
    start_worker(env, "-Q", "ledger_echo", "-c", "1", "--prefetch-multiplier", "1")
    # Then 10 runs before 9 (the API's 0-10 map onto the broker's 0-9 in order)
    conn = sqlite3.connect(db)
    rows = dict(conn.execute("SELECT priority, job_id FROM jobs").fetchall())
    conn.close()
    started = {priority: wait_for_job(db, job_id)["started_at"] for priority, job_id in rows.items()}
    assert sorted(started, key=lambda priority: started[priority]) == [10, 9, 5]
