"""The write-lock budget of job processes (cl_tasks.writeshare), and the JobStore that feeds it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from api_schema import api_row, create_sqlite, insert_sqlite

from cl_tasks import writeshare
from cl_tasks.jobs import JobStore
from cl_tasks.settings import SettingsError, load
from cl_tasks.writeshare import BURST, MAX_PAUSE, SPLIT_RECHECK, WriteShare


class Clock:
    """A clock the test moves; ``sleep`` moves it too."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def budget(share: float, clock: Clock, processes: int = 1) -> WriteShare:
    return WriteShare(share, lambda: processes, clock=clock, sleep=clock.sleep)


def test_lock_time_past_the_burst_is_paid_back_at_the_share() -> None:
    clock = Clock()
    share = budget(0.1, clock)
    share.spent(BURST)  # the burst: free
    assert share.wait() == 0
    share.spent(0.02)  # 20 ms over: paid back at 0.1 s of lock time per second
    assert share.wait() == pytest.approx(0.2)
    assert share.wait() == 0  # paid


def test_the_share_is_split_between_the_processes_holding_jobs() -> None:
    clock = Clock()
    share = budget(0.1, clock, processes=4)
    share.spent(BURST + 0.01)
    assert share.wait() == pytest.approx(0.01 / 0.025)


def test_time_passing_pays_and_an_idle_process_saves_no_more_than_the_burst() -> None:
    clock = Clock()
    share = budget(0.1, clock)
    share.spent(BURST + 0.01)
    clock.now += 0.1  # 0.1 s at 0.1 pays 10 ms
    assert share.wait() == pytest.approx(0, abs=1e-9)
    clock.now += 1000  # idle for long
    share.spent(BURST + 0.005)
    assert share.wait() == pytest.approx(0.05)


def test_one_wait_is_never_longer_than_max_pause() -> None:
    clock = Clock()
    share = budget(0.01, clock)
    share.spent(60.0)  # a transaction held the lock for a minute (a stalled disk)
    assert share.wait() == MAX_PAUSE
    assert share.wait() == pytest.approx(0, abs=1e-9)  # one pause paid for it: the debt stops there


def test_the_processes_are_counted_at_most_every_recheck() -> None:
    clock = Clock()
    counted = []

    def processes() -> int:
        counted.append(clock.now)
        return 2

    share = WriteShare(0.1, processes, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        share.spent(0.0001)  # a write (a claim, a progress) is never where they are counted
        share.wait()
        clock.now += SPLIT_RECHECK / 10
    assert 4 <= len(counted) <= 6


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """An era-A media_store.db (the API's DDL) holding two queued rows, j0 and j1."""
    path = tmp_path / "media_store.db"
    create_sqlite(path, "a")
    for n in range(2):
        insert_sqlite(path, api_row(f"j{n}", "image_resize", {"width": 4}))
    return path


def test_the_job_store_reports_the_lock_time_of_its_writes_only(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a JobStore on the API's era-A table with a budget, its reports recorded
    reported: list[float] = []
    monkeypatch.setattr(WriteShare, "spent", lambda self, seconds: reported.append(seconds))
    store = JobStore(f"sqlite:///{database}", write_share=0.5)
    # When it reads, nothing is reported; when it claims, one write's lock time is
    store.get("j0")
    assert reported == []
    assert store.claim("j0", "worker-a:1:j0", lease=30).outcome == "claimed"
    assert len(reported) == 1 and 0 < reported[0] < 5
    # And the budget is split between the processes holding a job and the one asking
    assert store._job_processes() == 2
    store.claim("j1", "worker-a:2:j1", lease=30)
    assert store._job_processes() == 3
    store.complete("j0", "worker-a:1:j0", {"ok": True})
    assert store._job_processes() == 2


def test_without_a_share_below_one_nothing_is_measured(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[float] = []
    monkeypatch.setattr(WriteShare, "spent", lambda self, seconds: reported.append(seconds))
    store = JobStore(f"sqlite:///{database}")
    store.claim("j0", "worker-a:1:j0", lease=30)
    store.pace()
    assert reported == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2", "DB_WRITE_SHARE='2' must be at most 1"),
        ("0", "must be above 0"),
        ("half", "must be a number"),
        ("nan", "must be a number"),
    ],
)
def test_a_bad_write_share_is_one_line_naming_it(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load({"CL_SERVER_DIR": str(tmp_path), "DB_WRITE_SHARE": value})


def test_the_default_share_is_no_limit(tmp_path: Path) -> None:
    assert load({"CL_SERVER_DIR": str(tmp_path)}).db_write_share == 1.0
    assert load({"CL_SERVER_DIR": str(tmp_path), "DB_WRITE_SHARE": "0.05"}).db_write_share == 0.05


def test_a_count_that_cannot_be_read_never_fails_the_write_before_it(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(f"sqlite:///{database}", write_share=0.5)
    assert store.claim("j0", "worker-a:1:j0", lease=30).outcome == "claimed"

    def unreadable() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    # When reads fail from now on, the count is 1 and a claim's commit still stands
    monkeypatch.setattr(store, "reading", unreadable)
    assert store._job_processes() == 1
    monkeypatch.setattr(writeshare, "SPLIT_RECHECK", 0.0)  # the next pace counts again
    store.pace()
    assert store.claim("j1", "worker-a:2:j1", lease=30).outcome == "claimed"
