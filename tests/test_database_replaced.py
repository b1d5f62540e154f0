"""``media_store.db`` replaced or deleted under running workers: noticed, logged once, reconnected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from tests import support
from transports.store import Store

TASK = "ledger_echo"
ERA = "a"
REPLACED = "media_store.db was replaced (inode"
DELETED = "media_store.db was deleted; waiting for it"


def _remove_database(database: Path) -> None:
    """Delete the file and its ``-wal`` and ``-shm``, as replacing an SQLite database needs."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)


@pytest.fixture
def running_worker(tmp_path: Path, start_worker: support.StartWorker) -> tuple[Path, support.Worker]:
    """A worker on an era-A media_store.db that has run one API job."""
    server = tmp_path / "data"
    server.mkdir()
    database = server / "media_store.db"
    support.make_api_database(database, ERA)
    env = support.compute_env(server, BROADCAST_TYPE="noop")
    worker = start_worker(env, "-Q", TASK, "-c", "1")
    support.insert_job(database, "before", TASK, {"ledger_path": "ledger.txt"}, ERA)
    assert support.wait_for_job(database, "before", 60)["status"] == "completed"
    return database, worker


def _an_api_row_runs(database: Path, worker: support.Worker, job_id: str) -> None:
    support.insert_job(database, job_id, TASK, {"ledger_path": "ledger.txt"}, ERA)
    row = support.wait_for_job(database, job_id, 60)
    assert (row["status"], row["error_message"]) == ("completed", None), worker.text()[-3000:]


def test_a_replaced_database_is_noticed_logged_once_and_its_new_jobs_run(
    running_worker: tuple[Path, support.Worker],
) -> None:
    database, worker = running_worker
    old_inode = os.stat(database).st_ino
    # Given a fresh era-A database made beside it
    fresh = database.with_name("fresh.db")
    support.make_api_database(fresh, ERA)
    # When it replaces media_store.db (the old one removed with its -wal and -shm)
    _remove_database(database)
    os.replace(fresh, database)
    new_inode = os.stat(database).st_ino
    # Then an API row inserted into the new file runs
    _an_api_row_runs(database, worker, "after")
    # And the worker said so once, naming both inodes
    assert worker.text().count(REPLACED) == 1
    assert f"{REPLACED} {old_inode} → {new_inode}); reconnecting" in worker.text()
    assert DELETED not in worker.text()
    # And the broker's routing came along: a second row runs too
    _an_api_row_runs(database, worker, "after-2")
    assert worker.text().count(REPLACED) == 1


def test_a_deleted_database_is_waited_for_and_its_remade_file_runs_jobs(
    running_worker: tuple[Path, support.Worker],
) -> None:
    database, worker = running_worker
    # When media_store.db is deleted
    _remove_database(database)
    # Then the worker says it waits for it, and makes no database of its own
    worker.wait_for_log(DELETED, 30)
    assert not database.exists()
    # And when the API's migrations make it again, an API row inserted into it runs
    support.make_api_database(database, ERA)
    _an_api_row_runs(database, worker, "after")
    assert worker.text().count(DELETED) == 1
    assert worker.text().count(REPLACED) == 1


def test_the_broker_store_reconnects_to_a_replacing_file_with_its_routing(tmp_path: Path) -> None:
    # Given a broker store on the API's database, with a queue bound
    database = tmp_path / "media_store.db"
    support.make_api_database(database, ERA)
    store = Store(database)
    store.declare_queue("image_resize", message_ttl=None, expires=None, auto_delete=False)
    store.bind("image_resize", "image_resize", "image_resize")
    # When a fresh database replaces the file
    fresh = tmp_path / "fresh.db"
    support.make_api_database(fresh, ERA)
    _remove_database(database)
    os.replace(fresh, database)
    # Then the store's next connection is on the new file (the path's inode is looked at
    # every 0.5 s), with the routing carried over

    def carried_over() -> bool:
        store.change_token()  # a use of the store: where it looks at the inode
        return support.count(database, "SELECT count(*) FROM kombu_binding") == 1

    support.wait_until(carried_over, 10, "routing in the new file", ignore=(OperationalError,))
    assert store.bindings() == [("image_resize", "image_resize", "image_resize")]
    assert store.routes("image_resize", "image_resize")
