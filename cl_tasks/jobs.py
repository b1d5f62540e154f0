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
``FOR UPDATE`` (``SKIP LOCKED`` for intake). On SQLite each process measures how
long its write transactions hold the file's write lock, and a job process paces its
claims to keep within ``DB_WRITE_SHARE`` (:mod:`cl_tasks.writeshare`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

from cl_tasks.jobs_table import (
    JobsTableMissing,
    Layout,
    intake,
    leases,
    ours,
    reflect,
)
from cl_tasks.jobs_table import metadata as jobs_metadata
from cl_tasks.settings import current, sqlite_path
from cl_tasks.writeshare import WriteShare
from transports import replaced
from transports.process import PerProcess
from transports.store import DatabaseFull

logger = logging.getLogger(__name__)

#: :meth:`JobStore.max_id` on SQLite, in the driver's own terms.
MAX_ID_SQLITE = "SELECT coalesce(max(id), 0) FROM jobs"

QUEUED, PROCESSING, COMPLETED, ERROR = "queued", "processing", "completed", "error"
#: Seconds SQLite waits for another writer before failing.
SQLITE_BUSY_TIMEOUT = 60.0
#: PostgreSQL's SQLSTATE for "could not extend file: No space left on device".
POSTGRESQL_DISK_FULL = "53100"


class JobRowError(RuntimeError):
    """Raised when a submitted job's row cannot be written: nothing was submitted."""


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
    retry_count: int | None = None
    max_retries: int | None = None

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


#: Key of a connection's ``info``: when its write transaction took SQLite's write lock.
LOCK_TAKEN = "cl_tasks_lock_taken"


def now_ms() -> int:
    return int(time.time() * 1000)


def _immediate_transactions(engine: Engine, synchronous: str) -> None:
    """Make pysqlite leave transactions to us and begin them with ``BEGIN IMMEDIATE``."""

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # Anyone can write any bytes into a TEXT column: one row of invalid UTF-8 must not
        # make every read fail (intake ends such a row ``error`` on its own).
        dbapi_connection.text_factory = _lenient_text
        # NORMAL is safe (never corrupts) only in WAL mode; a rollback-journal file keeps FULL.
        wal = dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        if wal or synchronous != "NORMAL":
            dbapi_connection.execute(f"PRAGMA synchronous={synchronous}")

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        read_only = connection.get_execution_options().get("cl_read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
        if not read_only:
            connection.info[LOCK_TAKEN] = time.perf_counter()


@dataclass
class _ProcessEngine:
    """This process's engine, the generation of the file it is on, its DBAPI connections."""

    engine: Engine
    watch: replaced.Watch | None
    generation: int
    connections: list[Any]


class JobStore:
    """The ``jobs`` table at ``url``; one engine per process, made after fork.

    On SQLite, a database file replaced or deleted and made again under the worker
    (:mod:`transports.replaced`, which logs it once) gets a new engine: the old one's
    connections are abandoned (never closed: closing would delete the new file's
    ``-wal`` by name), the table's layout is reflected again (the new file may be of
    another era) and our tables are made in the new file.
    """

    def __init__(self, url: str, *, synchronous: str = "NORMAL", write_share: float = 1.0) -> None:
        self.url = url
        self.synchronous = synchronous
        self._path = sqlite_path(sqlalchemy_url(url))
        #: This process's part of the write-lock budget (SQLite with a share below 1 only).
        self._share: PerProcess[WriteShare] | None = None
        if self._path is not None and write_share < 1:
            self._share = PerProcess(lambda: WriteShare(write_share, self._job_processes))
        # Pooled connections must never cross a fork: each process makes its own engine.
        self._engine: PerProcess[_ProcessEngine] = PerProcess(self._create_engine)
        self._reconnect_lock = threading.Lock()
        self._layout: Layout | None = None
        self._layout_lock = threading.Lock()
        self._statements: dict[Any, Any] = {}

    @property
    def engine(self) -> Engine:
        made = self._engine.get()
        if made.watch is not None and made.generation != made.watch.generation():
            made = self._reconnect(made)
        return made.engine

    def _reconnect(self, old: _ProcessEngine) -> _ProcessEngine:
        with self._reconnect_lock:
            if self._engine.get() is not old:
                return self._engine.get()
            for connection in old.connections:
                replaced.abandon(connection)
            old.engine.dispose(close=False)
            self._engine.reset()
            with self._layout_lock:
                self._layout, self._statements = None, {}
            return self._engine.get()

    @property
    def layout(self) -> Layout:
        """The ``jobs`` table as found (reflected once it exists; :class:`JobsTableMissing` before)."""
        layout = self._layout
        if layout is None:
            with self._layout_lock:
                if self._layout is None:
                    # A read-only connection: the first look may come inside a write transaction.
                    with self.reading() as conn:
                        self._layout = reflect(conn)
                    self._statements = {}
                layout = self._layout
        return layout

    @property
    def table(self) -> Table:
        return self.layout.table

    def ensure_jobs_table(self) -> None:
        """Create ``jobs`` (era A) when no API service made one: the standalone setup."""
        try:
            self.layout  # noqa: B018 - reflects the table
        except JobsTableMissing:
            create_tables(jobs_metadata, self.engine)
            logger.warning(
                "created the jobs table (era A) in %s: no API service had made one"
                " (start the API first when it should own this database)",
                self.engine.url.render_as_string(hide_password=True),
            )

    def _not_while_gone(self, *_: Any) -> None:
        """No new connection while the file is deleted: SQLite would make an empty one."""
        assert self._path is not None
        if replaced.watch(self._path).gone():
            raise replaced.DatabaseGone(f"{self._path} was deleted; waiting for it")

    def _create_engine(self) -> _ProcessEngine:
        url = sqlalchemy_url(self.url)
        connections: list[Any] = []
        watch = None if self._path is None else replaced.watch(self._path)
        generation = 0 if watch is None else watch.generation()
        if self._path is not None:
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
            _immediate_transactions(engine, self.synchronous)
            event.listen(
                engine, "connect", lambda dbapi_connection, _record: connections.append(dbapi_connection)
            )
            event.listen(engine, "do_connect", self._not_while_gone)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        # Only our own tables: ``jobs`` is the API's (see cl_tasks.jobs_table, start order).
        create_tables(ours, engine)
        return _ProcessEngine(engine, watch, generation, connections)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); a full disk raises :class:`DatabaseFull`."""
        began = time.perf_counter()
        taken = None
        try:
            with self.engine.begin() as conn:
                yield conn
                taken = conn.info.pop(LOCK_TAKEN, None)
        except OperationalError as exc:
            if not _is_disk_full(exc.orig):
                raise
            raise self._disk_full() from exc
        # (A transaction that ran no statement never took the lock: its value is an older one.)
        if taken is not None and taken >= began and self._share is not None:
            self._share.get().spent(time.perf_counter() - taken)

    def pace(self) -> None:
        """Before a job's claim: wait while this process is over its part of ``DB_WRITE_SHARE``."""
        if self._share is not None:
            self._share.get().wait()

    def _job_processes(self) -> int:
        """Processes sharing the write-lock budget: those holding a job now, and this one.

        A count that cannot be read (the file is being replaced, the disk failed) is 1:
        asked after a commit, it must never make that write look failed.
        """
        query = select(func.count()).select_from(leases).where(leases.c.expires_at > bindparam("b_now"))
        try:
            with self.reading() as conn:
                return 1 + int(conn.execute(query, {"b_now": time.time()}).scalar_one())
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            logger.debug("write share: the processes holding a job could not be counted: %s", exc)
            return 1

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
        layout = self.layout
        names = [name for name in Job.__dataclass_fields__ if layout.has(name)]
        return select(*[layout.read(name) for name in names]).select_from(layout.table)

    def _changed(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` of an update, with ``updated_at`` kept current where the table has it (era C)."""
        if self.layout.has("updated_at"):
            return {**values, "updated_at": bindparam("b_updated_at")}
        return values

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
        now = now_ms()
        values = self.layout.new_row(
            {
                "job_id": job_id,
                "task_type": task_type,
                "params": params if isinstance(params, str) else json.dumps(params),
                "status": QUEUED,
                "created_at": now,
                "updated_at": now,
                "created_by": created_by,
                **({} if priority is None else {"priority": priority}),
            }
        )
        table = self.table
        try:
            with self.transaction() as conn:
                # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT.
                insert = self._insert(table).values(**values).on_conflict_do_nothing()
                inserted = conn.execute(insert.returning(table.c.job_id)).first() is not None
                self._reserve_intake(conn, job_id)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            raise JobRowError(
                f"job {job_id} ({task_type}): its jobs row could not be written: {exc.orig};"
                " nothing was submitted"
            ) from exc
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
            row = conn.execute(self._select_jobs().where(self.table.c.job_id == job_id)).first()
        return None if row is None else self._job(row)

    def recent(self, *, status: str | None = None, limit: int = 50) -> list[Job]:
        query = self._select_jobs().order_by(self.table.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(self.table.c.status == status)
        with self.reading() as conn:
            return [self._job(row) for row in conn.execute(query)]

    def backlog(self) -> dict[str, int]:
        """Queued jobs per task type."""
        query = (
            select(self.table.c.task_type, func.count())
            .where(self.table.c.status == QUEUED)
            .group_by(self.table.c.task_type)
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
            .where(
                self.table.c.status == QUEUED, self.table.c.task_type.in_(types), self.table.c.id > after_id
            )
            .where(self.table.c.job_id.not_in(select(intake.c.job_id)))
            .order_by(self.table.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        reserved = []
        with self.transaction() as conn:
            for row in conn.execute(query).fetchall():
                job = self._job(row)
                if not _clean_text(job.job_id):
                    # Not even its id can be bound: end it by its row id, so it cannot block others.
                    message = f"job_id {job.job_id!r} is not valid UTF-8 text; the row cannot be run"
                    conn.execute(
                        self._statement("fail_row", self._fail_row), self._fail_row_params(job, message)
                    )
                    logger.error("queued row %s of jobs ended error: %s", job.id, message)
                elif self._reserve_intake(conn, job.job_id):
                    reserved.append(job)
        return reserved

    def _fail_row(self) -> Any:
        values = {
            "status": ERROR,
            "error_message": bindparam("b_message"),
            "completed_at": bindparam("b_now"),
        }
        return update(self.table).where(self.table.c.id == bindparam("b_id")).values(self._changed(values))

    @staticmethod
    def _fail_row_params(job: Job, message: str) -> dict[str, Any]:
        now = now_ms()
        return {"b_id": job.id, "b_message": message, "b_now": now, "b_updated_at": now}

    def max_id(self) -> int:
        """The highest ``id`` in ``jobs``: intake's look after every commit, so kept cheap.

        One statement needs no transaction of ours: it runs on a pooled driver
        connection directly, about six times faster than through :meth:`reading`.
        """
        self.layout  # noqa: B018 - JobsTableMissing (intake's "waits" line) before the API made it
        if self.engine.dialect.name != "sqlite":
            statement = self._statement("max_id", lambda: select(func.coalesce(func.max(self.table.c.id), 0)))
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

    def published_queued(self, task_types: Iterable[str], *, before: float, limit: int) -> list[str]:
        """Job ids of ``queued`` rows of ``task_types`` whose message was published before ``before``."""
        types = sorted(task_types)
        if not types:
            return []
        query = (
            select(intake.c.job_id)
            .join(self.table, self.table.c.job_id == intake.c.job_id)
            .where(
                self.table.c.status == QUEUED,
                self.table.c.task_type.in_(types),
                intake.c.published_at < before,
            )
            .order_by(intake.c.published_at)
            .limit(limit)
        )
        with self.reading() as conn:
            return [str(job_id) for (job_id,) in conn.execute(query)]

    def forget_published(self, job_ids: Iterable[str]) -> int:
        """Drop the publish marks of ``job_ids`` still ``queued``, so intake publishes them again."""
        job_ids = list(job_ids)
        if not job_ids:
            return 0
        still_queued = select(self.table.c.job_id).where(self.table.c.status == QUEUED)
        query = delete(intake).where(intake.c.job_id.in_(job_ids), intake.c.job_id.in_(still_queued))
        with self.transaction() as conn:
            return int(conn.execute(query).rowcount)

    # -- running ----------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease: float) -> Claim:
        """Take the job for ``owner``: once, or again when its last holder stopped renewing."""
        now = time.time()
        started = now_ms()
        params = {
            "b_job_id": job_id,
            "b_owner": owner,
            "b_expires": now + lease,
            "b_started": started,
            "b_updated_at": started,
        }
        with self.transaction() as conn:
            row = conn.execute(self._statement("claim_job", self._claim_job), params).first()
            if row is None:
                # Cancelled (the API deleted the row): its intake mark goes with it.
                conn.execute(self._statement("end_intake", self._end_intake), params)
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
        return self._select_jobs().where(self.table.c.job_id == bindparam("b_job_id")).with_for_update()

    @staticmethod
    def _lease_of() -> Any:
        return select(leases).where(leases.c.job_id == bindparam("b_job_id"))

    def _start_job(self) -> Any:
        values = {
            "status": PROCESSING,
            "started_at": bindparam("b_started"),
            "progress": 0,
            "error_message": None,
        }
        return (
            update(self.table)
            .where(self.table.c.job_id == bindparam("b_job_id"))
            .values(self._changed(values))
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
                update(self.table)
                .where(
                    self.table.c.job_id == bindparam("b_job_id"),
                    self.table.c.status == PROCESSING,
                    self._held(),
                )
                .values(self._changed({"progress": bindparam("b_progress")}))
            ),
        )
        params = {"b_job_id": job_id, "b_owner": owner, "b_progress": progress, "b_updated_at": now_ms()}
        with self.transaction() as conn:
            conn.execute(statement, params)

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

    def requeue(self, job_id: str, owner: str, note: str) -> bool:
        """Give ``owner``'s job back for another attempt: ``queued``, ``retry_count`` + 1, lease gone.

        Its intake reservation stays (its next message is on the way), so intake does
        not publish it a second time. False when ``owner`` no longer held it.
        """
        statement = self._statement("requeue", self._requeue_job)
        now = now_ms()
        params = {"b_job_id": job_id, "b_owner": owner, "b_note": note, "b_updated_at": now}
        with self.transaction() as conn:
            changed = conn.execute(statement, params).rowcount
            if changed:
                conn.execute(self._statement("end_lease", self._end_lease), params)
        return bool(changed)

    def _requeue_job(self) -> Any:
        values: dict[str, Any] = {"status": QUEUED, "progress": 0, "error_message": bindparam("b_note")}
        if self.layout.has("retry_count"):
            values["retry_count"] = self.table.c.retry_count + 1
        condition = (self.table.c.job_id == bindparam("b_job_id"), self.table.c.status == PROCESSING)
        return update(self.table).where(*condition, self._held()).values(self._changed(values))

    def _finish(
        self,
        job_id: str,
        owner: str | None,
        values: dict[str, Any],
        also: Callable[[Connection], Any] | None = None,
    ) -> bool:
        key = ("finish", owner is None, *values)
        params = {f"b_{name}": value for name, value in values.items()}
        # One instant for the row's end and its ``updated_at`` (era C): the same write.
        updated = values.get("completed_at") or now_ms()
        params |= {"b_job_id": job_id, "b_owner": owner, "b_updated_at": updated}
        finish = self._statement(key, lambda: self._finish_job(list(values), owner is not None))
        with self.transaction() as conn:
            changed = conn.execute(finish, params).rowcount
            gone = (
                not changed and conn.execute(self._statement("row_of", self._row_of), params).first() is None
            )
            if changed or gone:
                # A row the API deleted (a cancelled job) is not resurrected, and leaves nothing of ours.
                conn.execute(self._statement("end_lease", self._end_lease), params)
                conn.execute(self._statement("end_intake", self._end_intake), params)
            if changed and also is not None:
                also(conn)
        return bool(changed)

    def _row_of(self) -> Any:
        return select(self.table.c.id).where(self.table.c.job_id == bindparam("b_job_id"))

    def _finish_job(self, names: list[str], owned: bool) -> Any:
        condition = [
            self.table.c.job_id == bindparam("b_job_id"),
            self.table.c.status.in_((QUEUED, PROCESSING)),
        ]
        if owned:
            condition.append(self._held())
        values = self._changed({name: bindparam(f"b_{name}") for name in names})
        return update(self.table).where(*condition).values(values)

    @staticmethod
    def _end_lease() -> Any:
        return delete(leases).where(leases.c.job_id == bindparam("b_job_id"))

    @staticmethod
    def _end_intake() -> Any:
        return delete(intake).where(intake.c.job_id == bindparam("b_job_id"))


def _lenient_text(raw: bytes) -> str:
    """SQLite TEXT as str: invalid UTF-8 kept as surrogates (then refused by :func:`_clean_text`)."""
    return raw.decode("utf-8", "surrogateescape")


def _clean_text(value: Any) -> bool:
    """Whether ``value`` is a str that is valid UTF-8 (no surrogates from :func:`_lenient_text`)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    return JobStore(
        settings.database_url, synchronous=settings.sqlite_synchronous, write_share=settings.db_write_share
    )
