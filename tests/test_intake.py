"""Intake in-process on SQLite: API rows (the era-A fixture DDL) become broker messages; poison rows end alone."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_schema import api_row, create_sqlite, insert_sqlite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cl_tasks.app import App
from cl_tasks.intake import Intake
from cl_tasks.jobs import JobStore
from cl_tasks.settings import load
from transports.store import DatabaseFull, Store

SERVED = "image_resize"


def rows(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


class Rig:
    """An era-A media_store.db, its JobStore, a Celery app on it and an Intake (no thread)."""

    def __init__(self, folder: Path) -> None:
        self.db = folder / "media_store.db"
        create_sqlite(self.db, "a")
        self.store = JobStore(f"sqlite:///{self.db}")
        self.app = App("intake-test", broker=f"sqlite:///{self.db}", set_as_current=False)
        settings = load({"CL_SERVER_DIR": str(folder), "BROADCAST_TYPE": "noop"})
        self.intake = Intake(self.app, self.store, settings, lambda: [SERVED])

    def published(self) -> set[str]:
        """Job ids whose message is in the broker's queue."""
        payloads = rows(self.db, "SELECT payload FROM kombu_message WHERE queue = ?", SERVED)
        return {json.loads(payload)["headers"]["id"] for (payload,) in payloads}

    def close(self) -> None:
        self.app.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.close()


def test_an_api_row_becomes_one_message(rig: Rig) -> None:
    insert_sqlite(rig.db, api_row("j1", SERVED, {"width": 8}))
    insert_sqlite(rig.db, api_row("other", "image_conversion", {}))
    rig.intake.scan(after_id=0)
    rig.intake.scan(after_id=0)  # a second scan publishes nothing again
    assert rig.published() == {"j1"}
    assert rows(rig.db, "SELECT published_at IS NOT NULL FROM cl_tasks_intake WHERE job_id = 'j1'") == [(1,)]
    assert rows(rig.db, "SELECT status FROM jobs WHERE job_id = 'other'") == [("queued",)]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        (b'{"width": \xff}', "not valid UTF-8"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (42, "must be a JSON object"),
        (b'{"width": 1}', ""),  # a BLOB of valid JSON: runs
    ],
)
def test_a_poison_row_ends_error_alone_and_later_rows_still_run(rig: Rig, params: Any, reason: str) -> None:
    # Given a poison row between two good ones
    insert_sqlite(rig.db, api_row("before", SERVED, {}))
    insert_sqlite(rig.db, api_row("poison", SERVED, params))
    insert_sqlite(rig.db, api_row("after", SERVED, {}))
    # When intake scans
    rig.intake.scan(after_id=0)
    # Then the good rows have messages and the poison one ended error with the reason
    status, message = rows(rig.db, "SELECT status, error_message FROM jobs WHERE job_id = 'poison'")[0]
    if not reason:
        assert rig.published() == {"before", "poison", "after"}
        return
    assert rig.published() == {"before", "after"}
    assert status == "error" and reason in message


RAW_VALUE = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.recursive(
        st.none() | st.integers() | st.text(max_size=8), lambda kids: st.lists(kids, max_size=3)
    ).map(json.dumps),
    st.integers(min_value=1, max_value=6000).map(lambda depth: "[" * depth + "]" * depth),
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    params=RAW_VALUE,
    job_id=st.one_of(st.text(min_size=1, max_size=20), st.binary(min_size=1, max_size=20)),
    status=st.sampled_from(["queued", "QUEUED", "queued ", "processing", "", "done"]),
    priority=RAW_VALUE,
)
def test_no_raw_row_content_holds_back_a_good_row(
    tmp_path_factory: pytest.TempPathFactory, params: Any, job_id: Any, status: str, priority: Any
) -> None:
    rig = Rig(tmp_path_factory.mktemp("fuzz"))
    try:
        # Given one row of raw garbage the API (or anyone) wrote, then a good row
        bad = api_row("x", SERVED, None, status=status)
        bad.update(job_id=job_id, params=params if params is not None else "null", priority=priority)
        bad.pop("priority")  # era A has no priority column; the garbage goes where it can
        try:
            insert_sqlite(rig.db, bad)
        except (sqlite3.IntegrityError, OverflowError):
            return  # the database refused it (a duplicate job_id, an int past 64 bits): no row
        insert_sqlite(rig.db, api_row("control-job", SERVED, {"width": 1}))
        # When intake scans
        rig.intake.scan(after_id=0)
        # Then the good row has its message, and a queued garbage row either has one or ended error
        published = rig.published()
        assert "control-job" in published
        state = rows(rig.db, "SELECT status, error_message FROM jobs WHERE id = 1")[0]
        if status == "queued":
            assert (state[0] == "error" and state[1]) or (isinstance(job_id, str) and job_id in published)
        else:
            assert state[0] == status  # not ours to judge: left as the API wrote it
    finally:
        rig.close()


def test_a_text_column_holding_invalid_utf8_ends_error_alone(rig: Rig) -> None:
    # Given params TEXT that is not UTF-8 (sqlite3 cannot even read such a row by default)
    insert_sqlite(rig.db, api_row("poison", SERVED, "{}"))
    rows(rig.db, "UPDATE jobs SET params = CAST(x'7b22ff223a317d' AS TEXT) WHERE job_id = 'poison'")
    insert_sqlite(rig.db, api_row("after", SERVED, {}))
    rig.intake.scan(after_id=0)
    assert rig.published() == {"after"}
    status, message = rows(rig.db, "SELECT status, error_message FROM jobs WHERE job_id = 'poison'")[0]
    assert status == "error" and "not valid UTF-8" in message


@pytest.fixture
def no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows count as stranded as soon as their message is gone (30 s in production)."""
    monkeypatch.setattr("cl_tasks.intake.STRANDED_AFTER", 0.0)


def test_a_purged_job_is_published_again_and_a_live_one_is_not(rig: Rig, no_grace: None) -> None:
    # Given two API rows published, then `celery purge` (the broker's purge of the queue)
    insert_sqlite(rig.db, api_row("purged", SERVED, {"width": 8}))
    rig.intake.scan(after_id=0)
    with rig.app.connection_for_write() as conn:
        conn.default_channel.queue_purge(SERVED)
    insert_sqlite(rig.db, api_row("live", SERVED, {"width": 8}))
    rig.intake.scan(after_id=0)
    assert rig.published() == {"live"}
    # When intake looks for stranded rows and scans
    stranded = rig.intake.release_stranded(now=float("inf"))
    rig.intake.scan(after_id=0)
    # Then the purged job has its message again, and the live one was left alone (one message)
    assert stranded == ["purged"]
    assert rig.published() == {"purged", "live"}
    assert rows(rig.db, "SELECT count(*) FROM kombu_message") == [(2,)]


def test_a_dead_lettered_job_is_published_again_but_an_ended_one_is_not(rig: Rig, no_grace: None) -> None:
    # Given a job whose message a worker refused (dead letter), and one that completed
    insert_sqlite(rig.db, api_row("refused", SERVED, {"width": 8}))
    insert_sqlite(rig.db, api_row("done", SERVED, {"width": 8}))
    rig.intake.scan(after_id=0)
    with rig.app.connection_for_write() as conn:
        queue = conn.SimpleQueue(SERVED)
        for _ in range(2):
            message = queue.get(timeout=5)
            if message.headers["id"] == "refused":
                message.reject(requeue=False)
            else:
                rows(rig.db, "UPDATE jobs SET status = 'completed' WHERE job_id = 'done'")
                message.ack()
        queue.close()
    assert rows(rig.db, "SELECT count(*) FROM kombu_dead_letter") == [(1,)]
    # When intake looks for stranded rows and scans
    rig.intake.release_stranded(now=float("inf"))
    rig.intake.scan(after_id=0)
    # Then only the refused job is published again
    assert rig.published() == {"refused"}


def test_stranded_rows_wait_out_the_grace_period(rig: Rig) -> None:
    # A purged row is not published again before STRANDED_AFTER (its message may be on its way)
    insert_sqlite(rig.db, api_row("purged", SERVED, {"width": 8}))
    rig.intake.scan(after_id=0)
    with rig.app.connection_for_write() as conn:
        conn.default_channel.queue_purge(SERVED)
    assert rig.intake.release_stranded(now=float("inf")) == []
    assert rig.published() == set()


def test_the_rows_of_one_scan_are_published_in_one_broker_write(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given five API rows waiting, and the broker's writes counted
    for n in range(5):
        insert_sqlite(rig.db, api_row(f"j{n}", SERVED, {"width": n + 1}))
    lone, batched = [], []
    monkeypatch.setattr(Store, "_write", spy(Store._write, lone))
    monkeypatch.setattr(Store, "put_many", spy(Store.put_many, batched))
    # When intake scans
    rig.intake.scan(after_id=0)
    # Then the five messages went in with one transaction, none alone, and all five are marked
    assert [len(args[1]) for args in batched] == [5]
    assert not [args for args in lone if "INSERT INTO kombu_message" in rig_sql(args)]
    assert rig.published() == {f"j{n}" for n in range(5)}
    marked = rows(rig.db, "SELECT count(*) FROM cl_tasks_intake WHERE published_at IS NOT NULL")
    assert marked == [(5,)]


def test_messages_that_could_not_be_written_leave_their_rows_to_be_published_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two API rows, and a broker whose next batch write finds the disk full
    insert_sqlite(rig.db, api_row("j1", SERVED, {"width": 1}))
    insert_sqlite(rig.db, api_row("j2", SERVED, {"width": 2}))
    real = Store.put_many

    def disk_full_once(store: Store, batch: Any) -> None:
        monkeypatch.setattr(Store, "put_many", real)
        raise DatabaseFull("the disk is full")

    monkeypatch.setattr(Store, "put_many", disk_full_once)
    # When intake scans, the write fails: no message, and no row is marked published
    with pytest.raises(DatabaseFull):
        rig.intake.scan(after_id=0)
    assert rig.published() == set()
    assert rows(rig.db, "SELECT count(*) FROM cl_tasks_intake WHERE published_at IS NOT NULL") == [(0,)]
    # Then once the reservations are given up (as after STALE_RESERVATION), both are published
    rig.store.forget_stale_reservations(older_than=-1)
    rig.intake.scan(after_id=0)
    assert rig.published() == {"j1", "j2"}


def spy(method: Any, calls: list[tuple[Any, ...]]) -> Any:
    """``method``, recording the arguments of each call in ``calls``."""

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return method(*args, **kwargs)

    return recorded


def rig_sql(args: tuple[Any, ...]) -> str:
    """The SQL of a recorded ``Store._write(store, statement, params)`` call, prefix filled in."""
    store, statement = args[0], args[1]
    return str(store.sql(statement))


def test_a_publish_failing_mid_scan_keeps_the_messages_before_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three API rows, and a broker that refuses the second publish (a lost connection)
    for n in range(3):
        insert_sqlite(rig.db, api_row(f"j{n}", SERVED, {"width": n + 1}))
    real = rig.app.publish_job

    def refuse_j1(job_id: str, *args: Any) -> Any:
        if job_id == "j1":
            raise ConnectionError("broker connection lost")
        return real(job_id, *args)

    monkeypatch.setattr(rig.app, "publish_job", refuse_j1)
    # When intake scans, the error reaches the scan's caller
    with pytest.raises(ConnectionError):
        rig.intake.scan(after_id=0)
    # Then the message put before it is written and marked; the others wait for a later scan
    assert rig.published() == {"j0"}
    marked = rows(rig.db, "SELECT job_id FROM cl_tasks_intake WHERE published_at IS NOT NULL")
    assert marked == [("j0",)]
