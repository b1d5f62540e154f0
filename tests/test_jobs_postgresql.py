"""The jobs table on PostgreSQL (the machine's server): the same SQL, row locks instead of BEGIN IMMEDIATE."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from cl_tasks.jobs import JobStore, sqlalchemy_url
from tests.support import drop_postgresql_database, make_api_postgresql_database, port_open


@pytest.fixture
def pg_store() -> Iterator[JobStore]:
    """A JobStore on a fresh PostgreSQL database holding the API's exact jobs table."""
    # Fail (not skip) when the server is missing: CI starts it.
    assert port_open("127.0.0.1", 5432), "PostgreSQL is not running on 127.0.0.1:5432"
    name = f"cltest_{uuid.uuid4().hex[:12]}"
    store = JobStore(make_api_postgresql_database(name))
    yield store
    store.engine.dispose()
    drop_postgresql_database(name)


def test_plain_postgresql_url_uses_psycopg_3() -> None:
    assert sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("sqlite:////x.db") == "sqlite:////x.db"


def test_job_life_on_postgresql(pg_store: JobStore) -> None:
    job_id = f"pgtest-{uuid.uuid4().hex[:8]}"
    assert pg_store.create(job_id, "image_resize", {"width": 4}) is True
    assert pg_store.create(job_id, "image_resize", {"width": 4}) is False
    assert pg_store.claim(job_id, "owner-a", 30).outcome == "claimed"
    assert pg_store.claim(job_id, "owner-b", 30).outcome == "busy"
    pg_store.set_progress(job_id, "owner-a", 40)
    assert pg_store.get(job_id).progress == 40  # type: ignore[union-attr]
    assert pg_store.complete(job_id, "owner-a", {"ok": True}) is True
    done = pg_store.get(job_id)
    assert done is not None and done.status == "completed" and done.output() == {"ok": True}
    assert pg_store.claim(job_id, "owner-b", 30).outcome == "done"


def test_intake_reserves_a_queued_row_once_on_postgresql(pg_store: JobStore) -> None:
    job_id = f"pgtest-{uuid.uuid4().hex[:8]}"
    with pg_store.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (job_id, task_type, params, status, progress, created_at, retry_count, max_retries,"
                " priority) VALUES (:j, 'pgtest_type', '{}', 'queued', 0, 0, 0, 3, 5)"
            ),
            {"j": job_id},
        )
    first = pg_store.reserve_queued(["pgtest_type"], after_id=0, limit=10)
    second = pg_store.reserve_queued(["pgtest_type"], after_id=0, limit=10)
    assert [job.job_id for job in first] == [job_id]
    assert second == []
