"""A full disk: the database's filesystem runs out of space mid-run, then space comes back."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests import support

pytestmark = pytest.mark.chaos

TASK = "ledger_echo"
#: Size of the database's filesystem.
DISK_SIZE = "8m"
QUICK = {"ledger_path": "ledger/ledger.txt"}
#: Three seconds of work, reporting progress every half second (so it writes while the disk is full).
SLOW = {"ledger_path": "ledger/ledger.txt", "steps": 6, "seconds": 0.5}
#: Seconds the disk stays full: past the job lease (3 s) and the message lease (4 s).
FULL_SECONDS = 8.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """CL_SERVER_DIR on a tmpfs of 8 MiB; its ``ledger`` folder is bind-mounted from the real disk.

    The ledger must record every execution while the database's disk is full, and job
    paths must stay inside CL_SERVER_DIR: a bind mount is both.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "data"
    ledger_disk = tmp_path / "ledger-disk"
    disk.mkdir()
    ledger_disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs", str(disk)], check=True
    )
    try:
        (disk / "ledger").mkdir()
        subprocess.run(["mount", "--bind", str(ledger_disk), str(disk / "ledger")], check=True)
        try:
            yield disk
        finally:
            subprocess.run(["umount", "-l", str(disk / "ledger")], check=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC; returns it."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * size)
    finally:
        os.close(descriptor)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"\0")
    assert full.value.errno == errno.ENOSPC
    (disk / "probe").unlink()
    return filler


def checkpoint(database: Path) -> bool:
    """Checkpoint the WAL and truncate it to nothing; False if a reader or writer was in the way."""
    conn = sqlite3.connect(database, timeout=0.5)
    try:
        return bool(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0)
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def freeze_quiet(worker: support.LoggedProcess, database: Path) -> None:
    """Freeze ``worker`` at a moment it holds no lock and no read snapshot of the database."""
    for _ in range(100):
        worker.freeze()
        if checkpoint(database):
            return
        worker.thaw()
        time.sleep(0.05)  # let it run a moment before the next try
    raise AssertionError("the worker was never quiet long enough to checkpoint")


CLIENT = f"""
import json, cl_tasks
print(json.dumps([cl_tasks.submit_job("{TASK}", {QUICK!r}).id for _ in range(3)]))
"""


def test_a_full_disk_loses_nothing_and_the_worker_carries_on_after(
    small_disk: Path, start_worker: support.StartWorker
) -> None:
    """Nothing is lost or wrongly ended while the disk is full; every job completes after.

    A job whose runner was at work when the disk filled may run twice (at-least-once):
    the disk stays full past its lease, so once space is back its message is delivered
    again and the job taken over while the first run still waits to record its end.
    """
    database = small_disk / "media_store.db"
    ledger = small_disk / "ledger" / "ledger.txt"
    support.make_api_database(database)
    env = support.compute_env(
        small_disk,
        CELERY_BROKER_URL=f"sqlite:///{database}?visibility_timeout=4&polling_interval=0.5",
        JOB_LEASE_SECONDS="3",
        BROADCAST_TYPE="noop",
    )
    worker = start_worker(env, "-Q", TASK, "-c", "3")
    # Given a worker that ran some jobs
    for n in range(4):
        support.insert_job(database, f"warm-{n}", TASK, QUICK)
    support.wait_until(lambda: support.statuses(database)["completed"] == 4, 60, "the first jobs completed")
    # And is running two slow jobs, with a free process
    for n in range(2):
        support.insert_job(database, f"running-{n}", TASK, SLOW)
    support.wait_until(lambda: support.statuses(database)["processing"] == 2, 60, "two jobs running")
    # When, while it is frozen, the API inserts three rows, a client submits three jobs
    # (rows and messages) and the disk fills up
    freeze_quiet(worker, database)
    try:
        for n in range(3):
            support.insert_job(database, f"api-{n}", TASK, QUICK)
        submitted = json.loads(support.run_client(env, CLIENT))
        # An empty -wal file: no write can reuse room in it while the disk is full
        assert checkpoint(database)
        filler = fill(small_disk)
    finally:
        worker.thaw()
    job_ids = {f"warm-{n}" for n in range(4)} | {"running-0", "running-1"}
    job_ids |= {f"api-{n}" for n in range(3)} | set(submitted)
    assert len(job_ids) == 12
    time.sleep(FULL_SECONDS)  # the scenario: the disk stays full this long
    # Then the worker lives on and says what is wrong, where, and what to do
    assert worker.process.poll() is None
    log = worker.text()
    assert f"the disk is full; free space on the filesystem of {small_disk}" in log
    assert "intake of queued jobs waits: cannot write the jobs table" in log
    assert f"SQLite broker: cannot write {database}: the disk is full" in log
    # And no job is marked completed (or error) that did not run to its end
    assert support.statuses(database)["error"] == 0
    done = {
        row["job_id"] for row in support.query(database, "SELECT job_id FROM jobs WHERE status = 'completed'")
    }
    assert done <= set(support.ledger_runs(ledger))
    # And when space comes back, every job completes: no row and no message was lost
    filler.unlink()
    support.wait_until(
        lambda: support.statuses(database)["completed"] + support.statuses(database)["error"] == 12,
        90,
        "every job ended",
    )
    rows = support.query(database, "SELECT job_id, status, error_message FROM jobs")
    assert {row["job_id"] for row in rows} == job_ids
    assert [row for row in rows if row["status"] != "completed"] == []
    runs = support.ledger_runs(ledger)
    assert set(runs) == job_ids
    twice = {job_id for job_id, n in runs.items() if n > 1}
    assert twice <= {"running-0", "running-1"} and max(runs.values()) <= 2, runs
    support.wait_until(lambda: support.broker_left(database, TASK) == 0, 30, "every message acked")
    assert support.count(database, "SELECT count(*) FROM cl_tasks_job_lease") == 0
    assert support.count(database, "SELECT count(*) FROM cl_tasks_intake") == 0
    assert support.count(database, "SELECT count(*) FROM kombu_dead_letter") == 0
    assert worker.process.poll() is None
    print(f"disk full: ran twice {sorted(twice)}; traceback lines in the log: {log.count('Traceback')}")


def wait_for_the_wait(
    database: Path, job_id: str, worker: support.LoggedProcess, where: str, timeout: float
) -> None:
    """Wait until the log says ``where``; fail at once if the job ends meanwhile (it did not wait)."""

    def waiting() -> bool:
        row = support.job_row(database, job_id)
        assert row["status"] in ("queued", "processing"), f"the job did not wait: {row}"
        return where in worker.text()

    support.wait_until(waiting, timeout, f"{where!r} in the log", every=0.1)


#: Size of the output a job writes to the full disk, in bytes.
OUTPUT_BYTES = 256 * 1024
#: Three seconds of work, then an output on the database's disk.
WRITES_OUTPUT = {**SLOW, "output_path": "out/result.bin", "output_bytes": OUTPUT_BYTES}
#: Seconds the disk stays full once the job waits: past its first two pauses (1 s, 2 s).
WAIT_SECONDS = 4.0


@pytest.mark.parametrize("confinement", ["on", "off"])
def test_a_job_whose_output_goes_to_the_full_disk_waits_then_completes(
    small_disk: Path, start_worker: support.StartWorker, confinement: str
) -> None:
    """An output refused with ENOSPC waits (one log line), then is written once space is back.

    Confinement on: the runner writes its scratch folder (the worker's temp folder, not
    full) and the worker's copy into place waits. Off: the runner's own write fails, it
    says ``"errno": "ENOSPC"``, and the job runs again after each pause.
    """
    database = small_disk / "media_store.db"
    out = small_disk / "out"
    out.mkdir()
    support.make_api_database(database)
    env = support.compute_env(small_disk, RUNNER_CONFINEMENT=confinement, BROADCAST_TYPE="noop")
    worker = start_worker(env, "-Q", TASK, "-c", "1")
    # Given a job at work whose output goes to the database's disk
    support.insert_job(database, "big-output", TASK, WRITES_OUTPUT)
    support.wait_until(lambda: support.statuses(database)["processing"] == 1, 60, "the job running")
    # When the disk fills up before its runner is done
    filler = fill(small_disk)
    # Then the worker says once what it cannot write and where to free space, and the job waits
    said = f"job big-output: cannot write {'output' if confinement == 'on' else 'what its runner writes'}"
    where = f"the disk is full; free space on the filesystem of {out};"
    wait_for_the_wait(database, "big-output", worker, where, 30)
    time.sleep(WAIT_SECONDS)  # the scenario: the disk stays full this long while the job waits
    log = worker.text()
    assert said in log
    assert log.count(where) == 1
    row = support.job_row(database, "big-output")
    assert (row["status"], row["error_message"]) == ("processing", None)
    assert not (out / "result.bin").exists()
    # And once space is back the job completes with its whole output, and nothing else is left
    filler.unlink()
    row = support.wait_for_job(database, "big-output", 60)
    assert (row["status"], row["error_message"]) == ("completed", None)
    assert (out / "result.bin").read_bytes() == (b"big-output" * OUTPUT_BYTES)[:OUTPUT_BYTES]
    assert sorted(path.name for path in out.iterdir()) == ["result.bin"]
    assert "big-output: output" in worker.text() or "big-output: what its runner writes" in worker.text()
    assert "written after waiting" in worker.text()
    assert worker.text().count(where) == 1


@pytest.fixture
def full_output_disk(small_disk: Path) -> Iterator[Path]:
    """``small_disk/out``: a tmpfs of its own, filled up (the database's disk keeps room)."""
    out = small_disk / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(out)], check=True)
    try:
        yield out
    finally:
        subprocess.run(["umount", "-l", str(out)], check=True)


def test_image_tools_says_enospc_and_its_conversion_waits_for_space(
    small_disk: Path, full_output_disk: Path, start_worker: support.StartWorker
) -> None:
    """The image module's own write (confinement off) fails with ENOSPC: the job waits, then completes."""
    database = small_disk / "media_store.db"
    support.make_api_database(database)
    Image.new("RGB", (100, 80), (10, 200, 10)).save(small_disk / "photo.png")
    env = support.compute_env(small_disk, RUNNER_CONFINEMENT="off", BROADCAST_TYPE="noop")
    worker = start_worker(env, "-Q", "image_conversion", "-c", "1")
    # Given an output disk with no room
    filler = fill(full_output_disk)
    # When the API asks for a conversion onto it
    params = {"input_paths": ["photo.png"], "output_paths": ["out/photo.bmp"], "format": "bmp"}
    support.insert_job(database, "convert", "image_conversion", params)
    # Then the job waits, saying where to free space
    where = f"the disk is full; free space on the filesystem of {full_output_disk};"
    wait_for_the_wait(database, "convert", worker, where, 120)
    # And once space is back it completes with the image
    filler.unlink()
    row = support.wait_for_job(database, "convert", 60)
    assert (row["status"], row["error_message"]) == ("completed", None)
    assert (full_output_disk / "photo.bmp").read_bytes()[:2] == b"BM"
    assert worker.text().count(where) == 1
