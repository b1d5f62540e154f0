"""The ``jobs`` table of the cl_server API service: the only SQL for it.

SQLAlchemy Core, so the same code runs on SQLite and PostgreSQL. The API
service owns ``jobs``: it is created only when missing (with an index on
``status``), never altered, and extra columns (``priority`` …) are tolerated.
Two small tables of ours sit beside it:

``cl_tasks_job_lease``
    Who works on a ``processing`` job and until when. A worker renews its lease
    while the runner works; a job whose lease ran out is taken over.
``cl_tasks_intake``
    Jobs that have (or are about to get) a Celery message, so a queued row is
    published once: reserved first, marked published after the broker took it.

On SQLite the connection runs with ``synchronous=NORMAL`` (``SQLITE_SYNCHRONOUS``,
the broker's setting too: WAL commits are not fsynced one by one, so a power loss
may lose the last ones but never corrupts the file; ``FULL`` fsyncs every commit,
which costs about 1.5 ms each here). Every write transaction is ``BEGIN IMMEDIATE`` (a deferred
read-then-write transaction fails with ``SQLITE_BUSY_SNAPSHOT``, which
``busy_timeout`` does not retry); on PostgreSQL rows are locked with
``FOR UPDATE`` (``SKIP LOCKED`` for intake).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from cl_tasks.settings import current
from transports.process import PerProcess
from transports.store import DatabaseFull

#: :meth:`JobStore.max_id` on SQLite, in the driver's own terms.
MAX_ID_SQLITE = "SELECT coalesce(max(id), 0) FROM jobs"

metadata = MetaData()
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Text, unique=True, nullable=False),
    Column("task_type", Text, nullable=False),
    Column("params", Text, nullable=False, server_default="{}"),
    Column("status", Text, nullable=False),
    Column("progress", Integer, nullable=False, server_default="0"),
    Column("created_at", BigInteger),
    Column("started_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("task_output", Text),
    Column("error_message", Text),
    Column("retry_count", Integer, server_default="0"),
    Column("max_retries", Integer, server_default="3"),
    Column("created_by", Text),
    # Optional: used when the table has it (the API's may not); 0-9, higher first.
    Column("priority", Integer),
    Index("ix_jobs_status", "status"),
)
leases = Table(
    "cl_tasks_job_lease",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("expires_at", Float, nullable=False),
)
intake = Table(
    "cl_tasks_intake",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("reserved_at", Float, nullable=False),
    Column("published_at", Float),
)

QUEUED, PROCESSING, COMPLETED, ERROR = "queued", "processing", "completed", "error"
#: Columns the worker reads or writes; an existing ``jobs`` table must have them.
REQUIRED_COLUMNS = frozenset(
    {
        "job_id",
        "task_type",
        "params",
        "status",
        "progress",
        "created_at",
        "started_at",
        "completed_at",
        "task_output",
        "error_message",
    }
)
#: Seconds SQLite waits for another writer before failing.
SQLITE_BUSY_TIMEOUT = 60.0
#: PostgreSQL's SQLSTATE for "could not extend file: No space left on device".
POSTGRESQL_DISK_FULL = "53100"


class JobsTableError(RuntimeError):
    """Raised when the ``jobs`` table exists but lacks a column the worker needs."""


@dataclass(frozen=True)
class Job:
    """One row of ``jobs`` as the worker sees it."""

    id: int
    job_id: str
    task_type: str
    params: str
    status: str
    progress: int
    created_at: int | None
    started_at: int | None
    completed_at: int | None
    task_output: str | None
    error_message: str | None
    priority: int | None = None

    def output(self) -> Any:
        """``task_output`` decoded from JSON (None when unset)."""
        return None if self.task_output is None else json.loads(self.task_output)


@dataclass(frozen=True)
class Claim:
    """What claiming a job found: run it, it is already done, or someone else has it."""

    outcome: Literal["claimed", "done", "busy", "missing"]
    job: Job | None
    retry_in: float = 0.0


def sqlalchemy_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: ``postgresql://`` means psycopg 3 here.

    (SQLAlchemy's default PostgreSQL driver is psycopg2, which cl_tasks does not
    install; an explicit ``postgresql+driver://`` is left as it is.)
    """
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def now_ms() -> int:
    return int(time.time() * 1000)


def _immediate_transactions(engine: Engine, synchronous: str) -> None:
    """Make pysqlite leave transactions to us and begin them with ``BEGIN IMMEDIATE``."""

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # NORMAL is safe (never corrupts) only in WAL mode; a rollback-journal file keeps FULL.
        wal = dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        if wal or synchronous != "NORMAL":
            dbapi_connection.execute(f"PRAGMA synchronous={synchronous}")

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        read_only = connection.get_execution_options().get("cl_read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


class JobStore:
    """The ``jobs`` table at ``url``; one engine per process, made after fork."""

    def __init__(self, url: str, *, synchronous: str = "NORMAL") -> None:
        self.url = url
        self.synchronous = synchronous
        # Pooled connections must never cross a fork: each process makes its own engine.
        self._engine: PerProcess[Engine] = PerProcess(self._create_engine)
        self._columns: frozenset[str] = frozenset()
        self._statements: dict[Any, Any] = {}

    @property
    def engine(self) -> Engine:
        return self._engine.get()

    def _create_engine(self) -> Engine:
        url = sqlalchemy_url(self.url)
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
            _immediate_transactions(engine, self.synchronous)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        create_tables(metadata, engine)
        self._columns = frozenset(column["name"] for column in inspect(engine).get_columns("jobs"))
        missing = REQUIRED_COLUMNS - self._columns
        if missing:
            raise JobsTableError(
                f"the jobs table of {engine.url.render_as_string()} lacks columns {sorted(missing)};"
                " it must follow the cl_server schema (see README)"
            )
        return engine

    @property
    def has_priority(self) -> bool:
        self.engine  # noqa: B018 - reflects the columns
        return "priority" in self._columns

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); a full disk raises :class:`DatabaseFull`."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            if not _is_disk_full(exc.orig):
                raise
            raise self._disk_full() from exc

    def _disk_full(self) -> DatabaseFull:
        """:class:`DatabaseFull` naming this database and where space must be freed."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database:
            where = url.database
            disk = f"the filesystem of {os.path.dirname(os.path.abspath(where))}"
        else:
            where, disk = url.render_as_string(), "the database server"
        return DatabaseFull(f"cannot write the jobs table in {where}: the disk is full; free space on {disk}")

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only transaction: never takes SQLite's write lock."""
        with self.engine.connect() as plain:
            conn = plain.execution_options(cl_read_only=True)
            with conn.begin():
                yield conn

    def _statement(self, key: Any, build: Callable[[], Any]) -> Any:
        """The statement ``key``, built once per store, its values left as bind parameters.

        Building SQLAlchemy expressions costs several times more than running
        them, and for writes it would happen while holding SQLite's write lock.
        """
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build()
        return statement

    def _select_jobs(self) -> Any:
        names = [name for name in Job.__dataclass_fields__ if name != "priority" or self.has_priority]
        columns: list[Any] = [jobs.c[name] for name in names]
        return select(*columns).select_from(jobs)

    @staticmethod
    def _job(row: Any) -> Job:
        return Job(**row._mapping)

    # -- creating and reading -------------------------------------------------

    def create(
        self,
        job_id: str,
        task_type: str,
        params: str | dict[str, Any],
        *,
        priority: int | None = None,
        created_by: str | None = None,
    ) -> bool:
        """Insert a queued row with ``params`` (a dict, or its JSON text) and reserve its intake.

        Its message is on the way (the caller publishes it next). Returns False
        when the row already exists (a retry): nothing is changed then.
        """
        values: dict[str, Any] = {
            "job_id": job_id,
            "task_type": task_type,
            "params": params if isinstance(params, str) else json.dumps(params),
            "status": QUEUED,
            "progress": 0,
            "created_at": now_ms(),
            "created_by": created_by,
        }
        if priority is not None and self.has_priority:
            values["priority"] = priority
        with self.transaction() as conn:
            # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT.
            insert = self._insert(jobs).values(**values).on_conflict_do_nothing()
            inserted = conn.execute(insert.returning(jobs.c.job_id)).first() is not None
            self._reserve_intake(conn, job_id)
        return inserted

    def _reserve_intake(self, conn: Connection, job_id: str) -> bool:
        """Record that ``job_id``'s message is on its way; False if it was already."""
        statement = self._statement(
            "reserve_intake",
            lambda: (
                self._insert(intake)
                .values(job_id=bindparam("b_job_id"), reserved_at=bindparam("b_now"))
                .on_conflict_do_nothing()
                .returning(intake.c.job_id)
            ),
        )
        return conn.execute(statement, {"b_job_id": job_id, "b_now": time.time()}).first() is not None

    def _insert(self, table: Table) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def get(self, job_id: str) -> Job | None:
        with self.reading() as conn:
            row = conn.execute(self._select_jobs().where(jobs.c.job_id == job_id)).first()
        return None if row is None else self._job(row)

    def recent(self, *, status: str | None = None, limit: int = 50) -> list[Job]:
        query = self._select_jobs().order_by(jobs.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(jobs.c.status == status)
        with self.reading() as conn:
            return [self._job(row) for row in conn.execute(query)]

    def backlog(self) -> dict[str, int]:
        """Queued jobs per task type."""
        query = (
            select(jobs.c.task_type, func.count()).where(jobs.c.status == QUEUED).group_by(jobs.c.task_type)
        )
        with self.reading() as conn:
            return {task_type: count for task_type, count in conn.execute(query)}

    # -- intake ---------------------------------------------------------------

    def reserve_queued(self, task_types: Iterable[str], *, after_id: int, limit: int) -> list[Job]:
        """Reserve queued rows of ``task_types`` with no message yet (id above ``after_id``)."""
        types = sorted(task_types)
        if not types:
            return []
        query = (
            self._select_jobs()
            .where(jobs.c.status == QUEUED, jobs.c.task_type.in_(types), jobs.c.id > after_id)
            .where(jobs.c.job_id.not_in(select(intake.c.job_id)))
            .order_by(jobs.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        reserved = []
        with self.transaction() as conn:
            for row in conn.execute(query).fetchall():
                job = self._job(row)
                if self._reserve_intake(conn, job.job_id):
                    reserved.append(job)
        return reserved

    def max_id(self) -> int:
        """The highest ``id`` in ``jobs``: intake's look after every commit, so kept cheap.

        One statement needs no transaction of ours: it runs on a pooled driver
        connection directly, about six times faster than through :meth:`reading`.
        """
        if self.engine.dialect.name != "sqlite":
            statement = self._statement("max_id", lambda: select(func.coalesce(func.max(jobs.c.id), 0)))
            with self.reading() as conn:
                return int(conn.execute(statement).scalar_one())
        raw = self.engine.raw_connection()
        try:
            return int(raw.cursor().execute(MAX_ID_SQLITE).fetchone()[0])
        finally:
            raw.close()

    def mark_published(self, job_ids: Iterable[str]) -> None:
        """Record that the broker took the messages of ``job_ids`` (one transaction)."""
        job_ids = list(job_ids)
        if not job_ids:
            return
        statement = self._statement(
            "mark_published",
            lambda: (
                update(intake)
                .where(intake.c.job_id.in_(bindparam("b_job_ids", expanding=True)))
                .values(published_at=bindparam("b_now"))
            ),
        )
        with self.transaction() as conn:
            conn.execute(statement, {"b_job_ids": job_ids, "b_now": time.time()})

    def forget_stale_reservations(self, older_than: float) -> int:
        """Drop reservations whose publisher died before publishing, so intake retries them."""
        cutoff = time.time() - older_than
        query = delete(intake).where(intake.c.published_at.is_(None), intake.c.reserved_at < cutoff)
        with self.transaction() as conn:
            return int(conn.execute(query).rowcount)

    # -- running ----------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease: float) -> Claim:
        """Take the job for ``owner``: once, or again when its last holder stopped renewing."""
        now = time.time()
        params = {"b_job_id": job_id, "b_owner": owner, "b_expires": now + lease, "b_started": now_ms()}
        with self.transaction() as conn:
            row = conn.execute(self._statement("claim_job", self._claim_job), params).first()
            if row is None:
                return Claim("missing", None)
            job = self._job(row)
            if job.status in (COMPLETED, ERROR):
                return Claim("done", job)
            held = conn.execute(self._statement("lease_of", self._lease_of), params).first()
            if job.status == PROCESSING and held and held.owner != owner and held.expires_at > now:
                return Claim("busy", job, retry_in=held.expires_at - now)
            conn.execute(self._statement("start_job", self._start_job), params)
            conn.execute(self._statement("take_lease", self._take_lease), params)
        return Claim("claimed", job)

    def _claim_job(self) -> Any:
        return self._select_jobs().where(jobs.c.job_id == bindparam("b_job_id")).with_for_update()

    @staticmethod
    def _lease_of() -> Any:
        return select(leases).where(leases.c.job_id == bindparam("b_job_id"))

    @staticmethod
    def _start_job() -> Any:
        return (
            update(jobs)
            .where(jobs.c.job_id == bindparam("b_job_id"))
            .values(status=PROCESSING, started_at=bindparam("b_started"), progress=0, error_message=None)
        )

    def _take_lease(self) -> Any:
        upsert = self._insert(leases).values(
            job_id=bindparam("b_job_id"), owner=bindparam("b_owner"), expires_at=bindparam("b_expires")
        )
        return upsert.on_conflict_do_update(
            index_elements=[leases.c.job_id],
            set_={"owner": upsert.excluded.owner, "expires_at": upsert.excluded.expires_at},
        )

    def renew(self, job_id: str, owner: str, lease: float) -> bool:
        """Extend ``owner``'s lease; False if it lost the job."""
        statement = self._statement(
            "renew",
            lambda: (
                update(leases)
                .where(leases.c.job_id == bindparam("b_job_id"), leases.c.owner == bindparam("b_owner"))
                .values(expires_at=bindparam("b_expires"))
            ),
        )
        params = {"b_job_id": job_id, "b_owner": owner, "b_expires": time.time() + lease}
        with self.transaction() as conn:
            return bool(conn.execute(statement, params).rowcount)

    def set_progress(self, job_id: str, owner: str, progress: int) -> None:
        statement = self._statement(
            "set_progress",
            lambda: (
                update(jobs)
                .where(jobs.c.job_id == bindparam("b_job_id"), jobs.c.status == PROCESSING, self._held())
                .values(progress=bindparam("b_progress"))
            ),
        )
        with self.transaction() as conn:
            conn.execute(statement, {"b_job_id": job_id, "b_owner": owner, "b_progress": progress})

    @staticmethod
    def _held() -> Any:
        """Whether ``:b_owner`` holds the lease of ``:b_job_id``."""
        held = leases.c.job_id == bindparam("b_job_id"), leases.c.owner == bindparam("b_owner")
        return select(leases.c.job_id).where(*held).exists()

    def complete(
        self, job_id: str, owner: str, output: Any, also: Callable[[Connection], Any] | None = None
    ) -> bool:
        """Mark the job completed with ``output``; False if ``owner`` no longer held it.

        ``also`` runs in the same transaction when the row was ours (the result document).
        """
        values = {
            "status": COMPLETED,
            "progress": 100,
            "task_output": json.dumps(output),
            "error_message": None,
            "completed_at": now_ms(),
        }
        return self._finish(job_id, owner, values, also)

    def fail(self, job_id: str, message: str, owner: str | None = None) -> bool:
        """Mark the job ``error`` with ``message`` (any holder when ``owner`` is None)."""
        return self._finish(
            job_id, owner, {"status": ERROR, "error_message": message, "completed_at": now_ms()}
        )

    def _finish(
        self,
        job_id: str,
        owner: str | None,
        values: dict[str, Any],
        also: Callable[[Connection], Any] | None = None,
    ) -> bool:
        key = ("finish", owner is None, *values)
        params = {f"b_{name}": value for name, value in values.items()}
        params |= {"b_job_id": job_id, "b_owner": owner}
        finish = self._statement(key, lambda: self._finish_job(list(values), owner is not None))
        with self.transaction() as conn:
            changed = conn.execute(finish, params).rowcount
            if changed:
                conn.execute(self._statement("end_lease", self._end_lease), params)
                conn.execute(self._statement("end_intake", self._end_intake), params)
                if also is not None:
                    also(conn)
        return bool(changed)

    def _finish_job(self, names: list[str], owned: bool) -> Any:
        condition = [jobs.c.job_id == bindparam("b_job_id"), jobs.c.status.in_((QUEUED, PROCESSING))]
        if owned:
            condition.append(self._held())
        return update(jobs).where(*condition).values({name: bindparam(f"b_{name}") for name in names})

    @staticmethod
    def _end_lease() -> Any:
        return delete(leases).where(leases.c.job_id == bindparam("b_job_id"))

    @staticmethod
    def _end_intake() -> Any:
        return delete(intake).where(intake.c.job_id == bindparam("b_job_id"))


def create_tables(tables: MetaData, engine: Engine) -> None:
    """Create the missing tables of ``tables``; safe when processes race to do it.

    Two pool processes starting on a fresh PostgreSQL database both see a table
    missing and both create it; the loser's CREATE fails (a duplicate type) and is
    retried once, now finding the table there.
    """
    try:
        tables.create_all(engine, checkfirst=True)
    except (IntegrityError, ProgrammingError, OperationalError):
        tables.create_all(engine, checkfirst=True)


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether a driver error says the disk is full (SQLite or PostgreSQL)."""
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return getattr(error, "sqlstate", None) == POSTGRESQL_DISK_FULL


@cache
def job_store() -> JobStore:
    """The :class:`JobStore` on ``DATABASE_URL`` (its engine is made per process)."""
    settings = current()
    return JobStore(settings.database_url, synchronous=settings.sqlite_synchronous)
