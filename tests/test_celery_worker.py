"""A real ``celery worker`` (prefork, 2 processes) on the SQLite broker.

Tasks, retries with countdown, ETA, revoke, ``celery inspect``/``status``/
``control`` and the task events an event receiver (Flower's way) sees.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.signals import before_task_publish

from tests.support import Worker, capture_events, run_celery, subprocess_env, wait_until

NODE = f"w1@{socket.gethostname()}"


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp_path = tmp_path_factory.mktemp("celery-worker")
    database = tmp_path / "media_store.db"
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    return subprocess_env(
        TEST_BROKER_URL=f"sqlite:///{database}",
        TEST_RESULT_BACKEND=f"db+sqlite:///{database}",
        TEST_LEDGER=str(ledger),
    )


@pytest.fixture
def sample_app(worker_env: dict[str, str]) -> Iterator[Celery]:
    """A client app of its own per test (Celery caches backends and pools per app)."""
    app = Celery("client", broker=worker_env["TEST_BROKER_URL"], backend=worker_env["TEST_RESULT_BACKEND"])
    app.conf.update(
        database_engine_options={"connect_args": {"timeout": 60}},
        task_send_sent_event=True,
        accept_content=["json"],
    )
    yield app
    app.close()


def celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_celery(env, *args, app="apps.sample_tasks", timeout=60)


@pytest.fixture(scope="module")
def celery_worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    """A prefork worker with two processes, shared by the tests of this module."""
    log = Path(worker_env["TEST_LEDGER"]).parent / "worker.log"
    worker = Worker(
        worker_env, log, "-P", "prefork", "-c", "2", "-n", "w1@%h", app="apps.sample_tasks", gossip=True
    )
    worker.wait_ready(timeout=60)
    yield worker
    worker.stop()


def test_tasks_sent_from_the_test_run(sample_app: Celery, celery_worker: Worker) -> None:
    results = [sample_app.send_task("apps.sample_tasks.add", (n, n)) for n in range(10)]
    assert [result.get(timeout=30) for result in results] == [2 * n for n in range(10)]


def test_retry_with_countdown(sample_app: Celery, celery_worker: Worker) -> None:
    result = sample_app.send_task("apps.sample_tasks.flaky", ("k1",))
    assert result.get(timeout=30) == 2


def test_eta_task_runs_at_its_time(sample_app: Celery, celery_worker: Worker) -> None:
    eta = datetime.now(UTC) + timedelta(seconds=2)
    result = sample_app.send_task("apps.sample_tasks.add", (1, 2), eta=eta)
    assert result.get(timeout=30) == 3
    assert result.date_done is not None
    assert result.date_done.replace(tzinfo=UTC) >= eta - timedelta(milliseconds=50)


def test_revoke_before_it_runs(sample_app: Celery, celery_worker: Worker, worker_env: dict[str, str]) -> None:
    # Given a task the worker holds until its countdown of 3 s
    result = sample_app.send_task("apps.sample_tasks.record", ("revoked",), countdown=3)
    celery_worker.wait_for_log(f"Task apps.sample_tasks.record[{result.id}] received", timeout=20)
    # When it is revoked, Then it ends REVOKED at its time and never runs
    result.revoke()
    wait_until(lambda: result.state == "REVOKED", 20, "the task was revoked")
    assert not (Path(worker_env["TEST_LEDGER"]) / "runs").exists()


def test_revoke_terminate_stops_a_running_task(sample_app: Celery, celery_worker: Worker) -> None:
    result = sample_app.send_task("apps.sample_tasks.sleep_for", (30,))
    wait_until(lambda: result.state == "STARTED", 20, "the task started")
    result.revoke(terminate=True, signal="SIGKILL")
    wait_until(lambda: result.state == "REVOKED", 20, "the task was revoked")


def test_a_task_that_expires_while_it_waits_in_the_broker_ends_revoked(
    sample_app: Celery, celery_worker: Worker
) -> None:
    # Given a worker whose two processes (and prefetch window) are busy for 2 s
    sleepers = [sample_app.send_task("apps.sample_tasks.sleep_for", (2,)) for _ in range(2)]
    wait_until(lambda: all(each.state == "STARTED" for each in sleepers), 20, "both sleepers started")
    # When a task that expires in 1 s, and one that expires in a minute (the control), wait
    # behind them in the broker
    expiring = sample_app.send_task("apps.sample_tasks.add", (1, 1), expires=1)
    control = sample_app.send_task("apps.sample_tasks.add", (2, 2), expires=60)
    # Then the expired one still reaches the worker, which revokes it: the caller is not
    # left waiting; the other runs
    with pytest.raises(TaskRevokedError):
        expiring.get(timeout=20)
    assert expiring.state == "REVOKED"
    assert control.get(timeout=20) == 4


def test_apply_async_with_a_property_that_is_not_json_runs_the_task(
    sample_app: Celery, celery_worker: Worker
) -> None:
    # Given a client passing a Python object as an extra option (it becomes a message
    # property, as the handler in Celery's suite passes the publishing Signal on)
    add = sample_app.signature("apps.sample_tasks.add", (2, 3))
    # When it applies the task, Then the publish succeeds and the task runs
    assert add.apply_async(signal=before_task_publish).get(timeout=20) == 5


def test_inspect_ping_status_and_control(celery_worker: Worker, worker_env: dict[str, str]) -> None:
    ping = celery(worker_env, "inspect", "ping", "-d", NODE, "-t", "3")
    assert ping.returncode == 0, ping.stderr
    assert "pong" in ping.stdout
    status = celery(worker_env, "status", "-t", "3")
    assert status.returncode == 0, status.stderr
    assert NODE in status.stdout and "1 node online" in status.stdout
    registered = celery(worker_env, "inspect", "registered", "-t", "3")
    assert "apps.sample_tasks.add" in registered.stdout
    limit = celery(worker_env, "control", "rate_limit", "apps.sample_tasks.add", "100/m", "-t", "3")
    assert limit.returncode == 0, limit.stderr
    assert "new rate limit set successfully" in limit.stdout
    added = celery(worker_env, "control", "add_consumer", "extra", "-t", "3")
    assert "add consumer extra" in added.stdout
    queues = celery(worker_env, "inspect", "active_queues", "-t", "3")
    assert "'name': 'extra'" in queues.stdout


def test_task_events_reach_an_event_receiver(sample_app: Celery, celery_worker: Worker) -> None:
    # Given an event receiver capturing as Flower does (one long capture)
    sent: list[str] = []
    with sample_app.connection() as conn:
        seen, listener = capture_events(
            sample_app,
            conn,
            lambda event: event["type"] == "task-succeeded" and event.get("uuid") in sent,
            timeout=30,
            wakeup=False,
        )
        # When a task runs
        result = sample_app.send_task("apps.sample_tasks.add", (20, 22))
        sent.append(result.id)
        assert result.get(timeout=30) == 42
        listener.join(timeout=35)
    # Then its whole life reached the receiver through the topic exchange
    kinds = {event["type"] for event in seen if event.get("uuid") == result.id}
    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= kinds, seen
