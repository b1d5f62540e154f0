"""What the tests share: the API's database, SQL look-ups, waiting on an event, worker processes.

Plain functions and classes (``tests/conftest.py`` wraps the ones a fixture needs). Every
wait here waits on the event itself (a row state, a log line, a queue count) up to a
timeout; none of them is a fixed sleep.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from celery import Celery
from kombu.connection import Connection
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

import transports  # noqa: F401 - registers sqlite://
from tests import api_schema

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
TEST_MODULES = ROOT / "tests" / "compute_modules"
#: Venvs of compute modules, kept between runs so Pillow is installed once per machine.
TEST_VENVS = ROOT / ".venvs-test"
#: The documented bound of the ``-wal`` file in bytes (README, "WAL upkeep": wal_size_limit
#: plus one auto-checkpoint of slack).
WAL_BOUND = 16 * 1024 * 1024
#: Seconds between two looks while waiting for an event.
EVERY = 0.05

#: Where a test's jobs table lives: the SQLite file, or a PostgreSQL URL.
Database = Path | str


# -- waiting on an event ------------------------------------------------------------


def wait_until(
    check: Callable[[], T | None],
    timeout: float = 60.0,
    what: str | Callable[[], str] = "condition",
    *,
    every: float = EVERY,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Call ``check`` until it returns something truthy, and return that; fail after ``timeout`` s.

    Errors of the ``ignore`` types count as "not yet" (a server still starting); ``what``
    names the event in the failure (a callable: made at that moment, e.g. showing a row).
    """
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            last = value = check()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"{said}: not within {timeout}s; last: {last!r}")
        time.sleep(every)


def poll(check: Callable[[], T | None], timeout: float, *, every: float = EVERY) -> T | None:
    """Call ``check`` until it returns something truthy or ``timeout`` s pass; its last value."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def drain_until(conn: Connection, done: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """``conn.drain_events`` until ``done()`` (checked first: nothing more is taken after)."""

    def drained() -> bool:
        if done():
            return True
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=min(1.0, timeout))
        return done()

    wait_until(drained, timeout, what or "the messages were delivered", every=0)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


# -- the API's database ---------------------------------------------------------------

#: The API's other tables, beside ``jobs`` (they must never be touched).
API_OTHER_TABLES = (
    "CREATE TABLE entities (id INTEGER PRIMARY KEY, label TEXT, file_path TEXT)",
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
    "INSERT INTO entities (label, file_path) VALUES ('cat', 'cat.jpg')",
    "INSERT INTO users (name) VALUES ('admin')",
)
#: The era of the API's DDL the worker tests run on: B, the exact era-A table plus
#: ``priority INTEGER NOT NULL`` (the priority tests need the column); the jobs-layer
#: tests run every era (tests/test_jobstore.py, tests/test_intake.py on era A).
WORKER_TEST_ERA = "b"


def make_api_database(path: Path, era: str = WORKER_TEST_ERA) -> None:
    """A media_store.db made the way the API service makes it (WAL, its exact DDL, its tables)."""
    api_schema.create_sqlite(path, era)
    with sqlite3.connect(path) as conn:
        for statement in API_OTHER_TABLES:
            conn.execute(statement)
    conn.close()


def make_server_dir(parent: Path) -> Path:
    """``parent/data``: a CL_SERVER_DIR with the API's media_store.db and a small ``good.png``."""
    folder = parent / "data"
    folder.mkdir()
    make_api_database(folder / "media_store.db")
    Image.new("RGB", (30, 20), (10, 200, 10)).save(folder / "good.png")
    return folder


def make_api_postgresql_database(name: str) -> str:
    """A fresh PostgreSQL database ``name`` with the API's tables; returns its URL."""
    assert port_open("127.0.0.1", 5432), "PostgreSQL is not running on 127.0.0.1:5432"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    api_schema.create_postgresql(url, WORKER_TEST_ERA)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in API_OTHER_TABLES:
            conn.execute(statement.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY"))
    return url


def drop_postgresql_database(name: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- SQL look-ups -----------------------------------------------------------------------


def query(database: Database, sql: str, params: dict[str, object] | None = None) -> list[dict[str, Any]]:
    """Run one statement (``:name`` parameters) in its own transaction; rows as dicts."""
    with _engine(database).begin() as conn:
        result = conn.execute(text(sql), params or {})
        return [dict(row._mapping) for row in result] if result.returns_rows else []


def count(database: Database, sql: str, params: dict[str, object] | None = None) -> int:
    """The one number a ``SELECT count(*) ...`` returns."""
    return int(next(iter(query(database, sql, params)[0].values())))


@functools.cache
def _engine(database: Database) -> Engine:
    """One engine per database, without a pool: nothing stays open between statements."""
    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(
        url, poolclass=NullPool, connect_args={"timeout": 60} if isinstance(database, Path) else {}
    )


def insert_job(
    database: Database,
    job_id: str,
    task_type: str,
    params: object,
    era: str = WORKER_TEST_ERA,
    **columns: object,
) -> None:
    """INSERT a queued job row with plain SQL, as the API service of era ``era`` does."""
    values = api_schema.api_row(job_id, task_type, params, era, **columns)
    query(
        database,
        f"INSERT INTO jobs ({', '.join(values)}) VALUES ({', '.join(':' + name for name in values)})",
        values,
    )


def job_row(database: Database, job_id: str) -> dict[str, Any]:
    rows = query(database, "SELECT * FROM jobs WHERE job_id = :job_id", {"job_id": job_id})
    return rows[0] if rows else {}


def statuses(database: Database) -> Counter[str]:
    """How many jobs are in each status."""
    rows = query(database, "SELECT status, count(*) AS n FROM jobs GROUP BY status")
    return Counter({str(row["status"]): int(row["n"]) for row in rows})


def wait_for_job(database: Database, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll the row until it ends (completed or error)."""

    def ended() -> dict[str, Any] | None:
        row = job_row(database, job_id)
        return row if row.get("status") in ("completed", "error") else None

    return wait_until(ended, timeout, lambda: f"job {job_id} ended (row: {job_row(database, job_id)})")


def run_job(
    database: Database, job_id: str, task_type: str, params: object, timeout: float = 60.0
) -> dict[str, Any]:
    """INSERT a queued row as the API service does; wait until it ends; return it."""
    insert_job(database, job_id, task_type, params)
    return wait_for_job(database, job_id, timeout)


def sqlite_broker_path(broker: str) -> Path | None:
    return Path(broker.removeprefix("sqlite://").split("?", 1)[0]) if broker.startswith("sqlite://") else None


def broker_left(database: Path, queue: str) -> int:
    """Messages of ``queue`` in the SQLite broker table, taken or not (an ack deletes them)."""
    return count(database, "SELECT count(*) FROM kombu_message WHERE queue = :queue", {"queue": queue})


def messages_left(broker: str, queue: str) -> int:
    """Messages of ``queue`` still in the broker: on SQLite every row, taken or not;
    elsewhere the ready ones (stop the workers first, so nothing is held unacked)."""
    path = sqlite_broker_path(broker)
    if path is not None:
        return broker_left(path, queue)
    with Connection(broker) as conn:
        channel = conn.default_channel
        if hasattr(channel, "_size"):  # kombu's virtual transports (Redis): an empty queue has no key
            return int(channel._size(queue))
        return int(channel.queue_declare(queue, passive=True).message_count)


def publish_raw(
    database: Path, body: bytes, headers: dict[str, Any], content_type: str, content_encoding: str = "utf-8"
) -> None:
    """Publish a message as it is, bytes and headers, into the worker's ``ledger_echo`` queue."""
    with Connection(f"sqlite:///{database}") as conn:
        conn.Producer().publish(
            body,
            routing_key="ledger_echo",
            content_type=content_type,
            content_encoding=content_encoding,
            headers=headers,
        )


def wait_dead_letter(database: Path, marker: str, timeout: float = 30.0) -> str:
    """The reason of the dead letter whose stored message carries ``marker``."""
    rows = wait_until(
        lambda: query(
            database,
            "SELECT reason FROM kombu_dead_letter WHERE instr(payload, :marker) > 0",
            {"marker": marker},
        ),
        timeout,
        f"message {marker} was dead-lettered",
    )
    return str(rows[0]["reason"])


def capture_events(
    app: Celery,
    conn: Connection,
    until: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 60.0,
    wakeup: bool = True,
) -> tuple[list[dict[str, Any]], threading.Thread]:
    """Capture ``app``'s events in a thread as Flower does (one long capture) until ``until(event)``.

    Returns once the receiver consumes (its queue is declared and bound): the events seen
    (filled as they come) and the thread (ends after ``until`` or ``timeout`` s of silence).
    """
    seen: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event)
        if until(event):
            receiver.should_stop = True

    receiver = app.events.Receiver(conn, handlers={"*": on_event})
    consuming = threading.Event()
    consume_ready = receiver.on_consume_ready

    def on_consume_ready(*args: Any, **kwargs: Any) -> None:
        consume_ready(*args, **kwargs)
        consuming.set()

    receiver.on_consume_ready = on_consume_ready
    capture = {"limit": None, "timeout": timeout, "wakeup": wakeup}
    listener = threading.Thread(target=receiver.capture, kwargs=capture, daemon=True)
    listener.start()
    assert consuming.wait(timeout), "the event receiver did not start consuming"
    return seen, listener


def ledger_runs(ledger: Path) -> Counter[str]:
    """Executions per job id: the ``ledger_echo`` runner appends one line per execution."""
    return Counter(ledger.read_text().split()) if ledger.exists() else Counter()


# -- processes ----------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child Python processes that import this repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def compute_env(server_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a worker running the test compute modules on ``server_dir``."""
    return subprocess_env(
        CL_SERVER_DIR=str(server_dir),
        COMPUTE_MODULES_DIR=str(TEST_MODULES),
        COMPUTE_VENV_DIR=str(TEST_VENVS),
        WORKER_POLL_INTERVAL="1",
        **extra,
    )


def run_client(env: dict[str, str], script: str, timeout: float = 180) -> str:
    """Run ``script`` in a fresh Python (a Celery client with this env); returns stdout."""
    result = subprocess.run([PYTHON, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_python(
    env: dict[str, str] | None, *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with ``env`` (default: :func:`subprocess_env`), output captured."""
    return subprocess.run(
        [PYTHON, *args],
        env=subprocess_env() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_celery(
    env: dict[str, str], *args: str, app: str = "cl_tasks", timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``celery -A app ARGS`` (inspect, control, status, purge ...), output captured."""
    return run_python(env, "-m", "celery", "-A", app, *args, timeout=timeout, cwd=cwd)


class LoggedProcess:
    """A subprocess in its own process group, writing its log to ``log``."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        log: Path,
        cwd: Path | None = None,
        *,
        output: Path | None = None,
    ) -> None:
        """``output``: the file its stdout and stderr go to (a worker's banner); else inherited."""
        self.log = log
        stream = None if output is None else output.open("wb")
        self.process = subprocess.Popen(
            command, env=env, cwd=cwd, start_new_session=True, stdout=stream, stderr=stream
        )
        if stream is not None:
            stream.close()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_log(self, line: str, timeout: float = 60.0) -> None:
        """Wait until the log holds ``line``; fail at once if the process exits meanwhile."""

        def logged() -> bool:
            assert self.process.poll() is None, f"process exited:\n{self.text()}"
            return line in self.text()

        wait_until(logged, timeout, f"{line!r} in the log {self.log}", every=0.1)

    def wait_ready(self, timeout: float = 180.0) -> None:
        self.wait_for_log("ready.", timeout)

    def freeze(self) -> None:
        """SIGSTOP the process group: its pool stands still mid-whatever."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the process and its children (pool processes), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), SIGKILL after 30 s; nothing of its group is left."""
        stop_all([self])


class Worker(LoggedProcess):
    """A ``celery -A cl_tasks worker`` subprocess (``app`` for another Celery app)."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *args: str,
        app: str = "cl_tasks",
        gossip: bool = False,
        prefix: Sequence[str] = (),
        output: Path | None = None,
    ) -> None:
        flags = ["--without-mingle", *([] if gossip else ["--without-gossip"])]
        command = [PYTHON, "-m", "celery", "-A", app, "worker", "-l", "info", "--logfile", str(log), *flags]
        super().__init__([*prefix, *command, *args], env, log, output=output)


#: The ``start_worker`` fixture: ``start_worker(env, *celery_args, name="w1", ready=True)``.
StartWorker = Callable[..., Worker]


def stop_all(processes: Iterable[LoggedProcess]) -> None:
    """Warm shutdown of several processes at once: SIGTERM to all, then wait for each."""
    running = [each for each in processes if each.process.poll() is None]
    for each in running:
        each.process.send_signal(signal.SIGTERM)
    for each in running:
        try:
            each.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            each.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(each.process.pid, signal.SIGKILL)
