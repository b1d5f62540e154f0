"""JobStore in-process on SQLite, on the API's exact tables of every era (tests/fixtures/cl_server/)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from api_schema import ERAS, api_row, create_sqlite, ddl, insert_sqlite

from cl_tasks import jobs
from cl_tasks.jobs import JobRowError, JobStore
from cl_tasks.jobs_table import JobsTableError, JobsTableMissing


def rows(path: Path, sql: str, *args: object) -> list[sqlite3.Row]:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


@pytest.fixture(params=ERAS)
def era(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(tmp_path: Path, era: str) -> Path:
    path = tmp_path / "media_store.db"
    create_sqlite(path, era)
    return path


@pytest.fixture
def store(db: Path) -> JobStore:
    return JobStore(f"sqlite:///{db}")


def test_a_submitted_row_fills_every_not_null_column_the_api_fills(
    db: Path, store: JobStore, era: str
) -> None:
    # When a Celery-side job's row is written into the API's table
    assert store.create("j1", "image_resize", {"width": 4}, priority=10) is True
    # Then it carries the API's values (the INSERT would have failed otherwise)
    row = dict(rows(db, "SELECT * FROM jobs WHERE job_id = 'j1'")[0])
    assert (row["status"], row["progress"], row["retry_count"], row["max_retries"]) == ("queued", 0, 0, 3)
    assert row["params"] == '{"width": 4}' and row["created_at"] > 0
    assert store.layout.era == era.upper()
    if era != "a":
        assert row["priority"] == 10
    if era == "c":
        assert row["updated_at"] == row["created_at"]
    # And a second create of the same job changes nothing
    assert store.create("j1", "image_resize", {"width": 9}) is False


def test_claim_progress_complete_on_every_era(db: Path, store: JobStore, era: str) -> None:
    insert_sqlite(db, api_row("j1", "image_resize", {"width": 4}, era))
    claim = store.claim("j1", "w1", lease=30)
    assert claim.outcome == "claimed" and claim.job is not None and claim.job.params == '{"width": 4}'
    store.set_progress("j1", "w1", 40)
    assert rows(db, "SELECT status, progress FROM jobs")[0][:] == ("processing", 40)
    before = int(time.time() * 1000)
    assert store.complete("j1", "w1", {"processed_files": ["a.png"]}) is True
    row = dict(rows(db, "SELECT * FROM jobs")[0])
    output = row["output" if era == "c" else "task_output"]
    assert (row["status"], row["progress"], output) == ("completed", 100, '{"processed_files": ["a.png"]}')
    assert row["completed_at"] >= before
    if era == "c":
        assert row["updated_at"] == row["completed_at"]
    job = store.get("j1")
    assert job is not None and job.output() == {"processed_files": ["a.png"]}
    # Nothing of ours is left for an ended job
    assert not rows(db, "SELECT * FROM cl_tasks_job_lease") and not rows(db, "SELECT * FROM cl_tasks_intake")


def test_a_live_lease_is_respected_and_an_expired_one_taken_over(db: Path, store: JobStore, era: str) -> None:
    insert_sqlite(db, api_row("j1", "image_resize", {}, era))
    assert store.claim("j1", "w1", lease=30).outcome == "claimed"
    busy = store.claim("j1", "w2", lease=30)
    assert busy.outcome == "busy" and 25 < busy.retry_in <= 30
    assert store.complete("j1", "w2", {}) is False  # w2 never held it
    assert store.renew("j1", "w1", 0.001) is True
    time.sleep(0.01)  # the scenario: a lease of 1 ms has run out
    assert store.claim("j1", "w2", lease=30).outcome == "claimed"
    assert store.renew("j1", "w1", 30) is False  # w1 lost it
    assert store.complete("j1", "w2", {}) is True
    assert store.claim("j1", "w3", lease=30).outcome == "done"


def test_intake_reserves_each_queued_row_once(db: Path, store: JobStore, era: str) -> None:
    for n in range(3):
        insert_sqlite(db, api_row(f"j{n}", "image_resize", {}, era))
    insert_sqlite(db, api_row("other", "image_conversion", {}, era))
    first = store.reserve_queued(["image_resize"], after_id=0, limit=2)
    assert [job.job_id for job in first] == ["j0", "j1"]
    second = store.reserve_queued(["image_resize"], after_id=0, limit=10)
    assert [job.job_id for job in second] == ["j2"]
    assert store.reserve_queued(["image_resize"], after_id=0, limit=10) == []
    store.mark_published(["j0", "j1"])
    assert store.forget_stale_reservations(older_than=-1) == 1  # j2 was never published
    assert [job.job_id for job in store.reserve_queued(["image_resize"], after_id=0, limit=10)] == ["j2"]


def test_a_crashed_attempt_is_requeued_counting_it(db: Path, store: JobStore, era: str) -> None:
    insert_sqlite(db, api_row("j1", "image_resize", {}, era))
    store.claim("j1", "w1", lease=30)
    assert store.requeue("j1", "w1", "attempt 1 failed") is True
    row = dict(rows(db, "SELECT * FROM jobs")[0])
    assert (row["status"], row["retry_count"], row["error_message"]) == ("queued", 1, "attempt 1 failed")
    assert not rows(db, "SELECT * FROM cl_tasks_job_lease")
    again = store.claim("j1", "w2", lease=30).job
    assert again is not None and again.retry_count == 1


def test_a_row_deleted_while_running_is_not_resurrected(db: Path, store: JobStore, era: str) -> None:
    insert_sqlite(db, api_row("j1", "image_resize", {}, era))
    store.reserve_queued(["image_resize"], after_id=0, limit=10)
    store.claim("j1", "w1", lease=30)
    rows(db, "DELETE FROM jobs WHERE job_id = 'j1'")
    assert store.complete("j1", "w1", {"x": 1}) is False
    assert rows(db, "SELECT count(*) FROM jobs")[0][0] == 0
    assert not rows(db, "SELECT * FROM cl_tasks_job_lease") and not rows(db, "SELECT * FROM cl_tasks_intake")
    assert store.claim("j1", "w2", lease=30).outcome == "missing"


def test_a_row_the_database_refuses_raises_with_its_reason(db: Path, store: JobStore) -> None:
    rows(db, "CREATE TRIGGER no_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'jobs are closed'); END")
    with pytest.raises(JobRowError, match="jobs are closed"):
        store.create("j1", "image_resize", {})


def test_a_row_whose_job_id_is_not_utf8_ends_error_alone(db: Path, store: JobStore, era: str) -> None:
    insert_sqlite(db, {**api_row("x", "image_resize", {}, era), "job_id": b"\xff\xfe-bad"})
    insert_sqlite(db, api_row("good", "image_resize", {}, era))
    reserved = store.reserve_queued(["image_resize"], after_id=0, limit=10)
    assert [job.job_id for job in reserved] == ["good"]
    bad = rows(db, "SELECT status, error_message FROM jobs WHERE id = 1")[0]
    assert bad[0] == "error" and "not valid UTF-8" in bad[1]


def test_no_jobs_table_is_waited_for_and_never_made_at_start(tmp_path: Path) -> None:
    # Given a database the API has not migrated yet
    db = tmp_path / "media_store.db"
    store = JobStore(f"sqlite:///{db}")
    # When the worker's store looks at it
    with pytest.raises(JobsTableMissing):
        store.layout  # noqa: B018
    store.forget_stale_reservations(60)  # our own tables work meanwhile
    # Then the API's migration (era A) still succeeds afterwards, and the store then sees it
    create_sqlite(db, "a")
    assert store.layout.era == "A"


def test_the_first_celery_side_job_creates_an_era_a_table_when_no_api_made_one(tmp_path: Path) -> None:
    db = tmp_path / "media_store.db"
    store = JobStore(f"sqlite:///{db}")
    store.ensure_jobs_table()
    assert store.create("j1", "image_resize", {}) is True
    columns = {row[1]: (row[2], row[3]) for row in rows(db, "PRAGMA table_info(jobs)")}
    api = sqlite3.connect(":memory:")
    for statement in ddl("a"):
        api.execute(statement)
    assert columns == {row[1]: (row[2], row[3]) for row in api.execute("PRAGMA table_info(jobs)")}


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("job_id VARCHAR NOT NULL,", "", r"lacks column.*job_id"),
        ("created_by VARCHAR,", "created_by VARCHAR, tenant VARCHAR NOT NULL,", "tenant"),
    ],
    ids=["a needed column missing", "an unknown NOT NULL column without a default"],
)
def test_a_table_the_worker_cannot_use_is_refused_naming_the_column(
    tmp_path: Path, old: str, new: str, named: str
) -> None:
    db = tmp_path / "media_store.db"
    with sqlite3.connect(db) as conn:
        conn.execute(ddl("a")[0].replace(old, new))
    with pytest.raises(JobsTableError, match=named):
        JobStore(f"sqlite:///{db}").layout  # noqa: B018


def test_optional_columns_may_be_missing(tmp_path: Path) -> None:
    db = tmp_path / "media_store.db"
    statement = ddl("a")[0].replace("created_by VARCHAR,", "")
    with sqlite3.connect(db) as conn:
        conn.execute(statement)
    store = JobStore(f"sqlite:///{db}")
    assert not store.layout.has("created_by")
    assert store.create("j1", "image_resize", {}, created_by="api") is True
    assert store.claim("j1", "w1", 30).outcome == "claimed"


@pytest.mark.parametrize("pg_era", ERAS)
def test_every_era_on_postgresql(pg_era: str) -> None:
    import uuid

    import psycopg
    from api_schema import create_postgresql

    admin_url = "postgresql://root@127.0.0.1:5432/test"
    name = f"cljobs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        create_postgresql(url, pg_era)
        store = JobStore(url)
        assert store.create("j1", "image_resize", {"width": 4}, priority=10) is True
        assert store.claim("j1", "w1", lease=30).outcome == "claimed"
        assert store.complete("j1", "w1", {"processed_files": ["a"]}) is True
        job = store.get("j1")
        assert job is not None and job.status == "completed" and job.output() == {"processed_files": ["a"]}
        assert json.loads(job.params) == {"width": 4}
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT * FROM jobs").fetchone()
            names = [column.name for column in conn.execute("SELECT * FROM jobs LIMIT 0").description or []]
        values = dict(zip(names, row or (), strict=True))
        assert (values["retry_count"], values["max_retries"], values["progress"]) == (0, 3, 100)
        if pg_era == "c":
            assert (
                values["output"] == {"processed_files": ["a"]}
                and values["updated_at"] == values["completed_at"]
            )
        store.engine.dispose()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_job_ends_and_is_updated_at_one_instant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given era C, and a clock that moves a millisecond at every look (as it may between two)
    path = tmp_path / "media_store.db"
    create_sqlite(path, "c")
    insert_sqlite(path, api_row("j1", "image_resize", {"width": 4}, "c"))
    insert_sqlite(path, api_row("j2", "image_resize", {"width": 4}, "c"))
    ticks = iter(range(1_800_000_000_000, 1_800_000_001_000))
    monkeypatch.setattr(jobs, "now_ms", lambda: next(ticks))
    store = JobStore(f"sqlite:///{path}")
    store.claim("j1", "w1", lease=30)
    # When one job completes and one fails
    store.complete("j1", "w1", {"processed_files": []})
    store.fail("j2", "bad input")
    # Then each row's updated_at is its completed_at
    for row in rows(path, "SELECT updated_at, completed_at FROM jobs"):
        assert row["updated_at"] == row["completed_at"]
