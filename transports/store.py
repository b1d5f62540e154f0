"""The broker tables of the SQLite transport: the only SQL for them.

A :class:`Store` owns one database file and hands each thread of each process
its own ``sqlite3`` connection (SQLite connections must never cross a fork, and
Celery acks from threads other than the consumer's). Every statement is a named
constant below; ``{p}`` is the table prefix (``kombu_`` by default), so the
broker tables sit beside the API service's tables without touching them.

Tables:

``{p}message``
    One row per message in one queue. ``visible_at`` is the time (epoch
    seconds) from which the row may be claimed: ``0`` when ready, the lease
    expiry while a consumer holds it. ``lease_owner`` names that consumer.
``{p}queue``, ``{p}exchange``, ``{p}binding``
    Declared entities and routing, shared by every process on the file.
``{p}consumer``
    Who consumes which queue: one row per consumer tag of a channel, kept alive
    by its process (``alive_until``). An auto-delete queue is deleted when its
    last consumer, in any process, is cancelled, or when the row of the last
    one runs out because its process died (as RabbitMQ deletes it when the last
    consumer goes, connection loss included). Passive declares report the
    live consumers.
``{p}dead_letter``
    Messages that could not be decoded or were rejected without requeue, with
    the reason, kept for ``dead_letter_retention`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from transports import replaced
from transports.process import PerProcess

logger = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {p}message (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        payload TEXT NOT NULL,
        visible_at REAL NOT NULL DEFAULT 0,
        lease_owner TEXT,
        expires_at REAL,
        delivery_count INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL)""",
    # Serves the claim: one seek per queue to the highest priority, oldest row.
    "CREATE INDEX IF NOT EXISTS {p}message_claim ON {p}message (queue, priority DESC, id)",
    "CREATE INDEX IF NOT EXISTS {p}message_lease ON {p}message (lease_owner) WHERE lease_owner IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS {p}message_expiry ON {p}message (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS {p}queue (
        name TEXT PRIMARY KEY,
        message_ttl REAL,
        expires REAL,
        auto_delete INTEGER NOT NULL DEFAULT 0,
        last_used REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {p}exchange (
        name TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        durable INTEGER NOT NULL DEFAULT 1,
        auto_delete INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS {p}binding (
        exchange TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        queue TEXT NOT NULL,
        PRIMARY KEY (exchange, routing_key, queue)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS {p}binding_queue ON {p}binding (queue)",
    """CREATE TABLE IF NOT EXISTS {p}consumer (
        queue TEXT NOT NULL,
        owner TEXT NOT NULL,
        tag TEXT NOT NULL,
        alive_until REAL NOT NULL,
        PRIMARY KEY (queue, owner, tag)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS {p}consumer_owner ON {p}consumer (owner)",
    """CREATE TABLE IF NOT EXISTS {p}dead_letter (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        payload TEXT NOT NULL,
        reason TEXT NOT NULL,
        dead_at REAL NOT NULL)""",
)

# A message's expiry: the earlier of its own (``:msg_expires``) and the
# queue's x-message-ttl counted from now; NULL when neither is set.
_EXPIRY = """CASE
    WHEN q.message_ttl IS NULL THEN :msg_expires
    WHEN :msg_expires IS NULL THEN :now + q.message_ttl
    ELSE min(:msg_expires, :now + q.message_ttl) END"""

PUT = (
    "INSERT INTO {p}message (queue, priority, payload, expires_at, created_at)"
    " SELECT t.name, :priority, :payload, " + _EXPIRY + ", :now"
    " FROM (SELECT :queue AS name) AS t LEFT JOIN {p}queue AS q ON q.name = t.name"
)
_ROUTE = (
    "INSERT INTO {p}message (queue, priority, payload, expires_at, created_at)"
    " SELECT b.queue, :priority, :payload, " + _EXPIRY + ", :now"
    " FROM {p}binding AS b LEFT JOIN {p}queue AS q ON q.name = b.queue"
    " WHERE b.exchange = :exchange AND {match} GROUP BY b.queue"
)
_MATCH_BY_TYPE = {
    "direct": "b.routing_key = :routing_key",
    "fanout": "1",
    "topic": "kombu_topic_match(b.routing_key, :routing_key)",
}
ROUTE_BY_TYPE = {kind: _ROUTE.replace("{match}", match) for kind, match in _MATCH_BY_TYPE.items()}
# Whether a message for the exchange and routing key would reach any queue (a read).
ROUTED_BY_TYPE = {
    kind: "SELECT 1 FROM {p}binding AS b WHERE b.exchange = :exchange AND " + match + " LIMIT 1"
    for kind, match in _MATCH_BY_TYPE.items()
}
# The delivery order of a consumer's queues: priority first (higher first), then the
# global row id, which is publish order (ids are taken under the write lock, so id order
# is commit order). One queue's order is the same (queue, priority DESC, id) as before;
# several queues merge into one sequence, as if they were one queue.
_READY_IN = (
    "SELECT id FROM {p}message WHERE queue = q.value AND visible_at <= :now"
    " AND (expires_at IS NULL OR expires_at > :now) ORDER BY priority DESC, id"
)
# The next ready message of each of :queues (a JSON list): one index seek per queue.
HEADS = (
    "SELECT m.queue, m.priority, m.id FROM json_each(:queues) AS q"
    " JOIN {p}message AS m ON m.id = (" + _READY_IN + " LIMIT 1)"
)
# The first :limit ready messages in delivery order that come before the message
# (:before_priority, :before_id) (no bound when :before_id is NULL); the bound filters
# an ordered list, so what passes is a prefix of it.
_BEFORE = (
    " WHERE :before_id IS NULL OR priority > :before_priority"
    " OR (priority = :before_priority AND id < :before_id)"
)
# Of one queue (:queue): one index scan, the common case (a worker's task channel).
_CLAIMABLE_ONE = (
    "SELECT id FROM (SELECT id, priority FROM {p}message WHERE queue = :queue AND visible_at <= :now"
    " AND (expires_at IS NULL OR expires_at > :now) ORDER BY priority DESC, id LIMIT :limit)" + _BEFORE
)
# Of several queues (:queues, a JSON list), merged: each queue gives at most :limit rows
# through its index, so the sort is of a few rows however deep the queues are. A read:
# inside an UPDATE the same merge costs five times as much (SQLite plans it otherwise),
# so the rows it picks are claimed by id (CLAIM_LISTED), the conditions checked again.
CLAIMABLE_MERGED = (
    "SELECT id FROM (SELECT m.id, m.priority FROM json_each(:queues) AS q"
    " JOIN {p}message AS m ON m.id IN (" + _READY_IN + " LIMIT :limit)"
    " ORDER BY m.priority DESC, m.id LIMIT :limit)" + _BEFORE
)
_LISTED = (
    "id IN (SELECT value FROM json_each(:ids)) AND visible_at <= :now"
    " AND (expires_at IS NULL OR expires_at > :now)"
)
_CLAIM = (
    "UPDATE {p}message SET visible_at = :lease_until, lease_owner = :owner,"
    " delivery_count = delivery_count + 1 WHERE {rows}"
    " RETURNING id, priority, payload, delivery_count, queue"
)
_TAKE = "DELETE FROM {p}message WHERE {rows} RETURNING id, priority, payload, 1, queue"
#: Claim (lease) and take (no-ack: delete) of one queue, in one statement.
CLAIM = _CLAIM.replace("{rows}", "id IN (" + _CLAIMABLE_ONE + ")")
TAKE = _TAKE.replace("{rows}", "id IN (" + _CLAIMABLE_ONE + ")")
#: The same of the rows :ids (a JSON list) picked by :data:`CLAIMABLE_MERGED`, if still ready.
CLAIM_LISTED = _CLAIM.replace("{rows}", _LISTED)
TAKE_LISTED = _TAKE.replace("{rows}", _LISTED)
ACK = "DELETE FROM {p}message WHERE id = ? AND lease_owner = ?"
ACK_MANY = "DELETE FROM {p}message WHERE lease_owner = ? AND id IN (SELECT value FROM json_each(?))"
RELEASE = "UPDATE {p}message SET visible_at = 0, lease_owner = NULL WHERE id = ? AND lease_owner = ?"
EXTEND = "UPDATE {p}message SET visible_at = ? WHERE lease_owner = ?"
DEAD_LETTER = (
    "INSERT INTO {p}dead_letter (queue, payload, reason, dead_at)"
    " SELECT queue, payload, ?, ? FROM {p}message WHERE id = ? AND lease_owner IS ?"
)
DELETE_MESSAGE = "DELETE FROM {p}message WHERE id = ? AND lease_owner IS ?"
DEAD_LETTER_PAYLOAD = "INSERT INTO {p}dead_letter (queue, payload, reason, dead_at) VALUES (?, ?, ?, ?)"
SIZE = (
    "SELECT count(*) FROM {p}message WHERE queue = :queue AND visible_at <= :now"
    " AND (expires_at IS NULL OR expires_at > :now)"
)
PURGE = "DELETE FROM {p}message WHERE queue = ? AND visible_at <= ?"
DECLARE_QUEUE = (
    "INSERT INTO {p}queue (name, message_ttl, expires, auto_delete, last_used)"
    " VALUES (:name, :message_ttl, :expires, :auto_delete, :now)"
    " ON CONFLICT (name) DO UPDATE SET last_used = :now"
)
QUEUE_EXISTS = "SELECT 1 FROM {p}queue WHERE name = :name AND (expires IS NULL OR last_used + expires > :now)"
QUEUE_AUTO_DELETE = "SELECT auto_delete FROM {p}queue WHERE name = ?"
TOUCH_QUEUE = "UPDATE {p}queue SET last_used = ? WHERE name = ? AND expires IS NOT NULL"
QUEUE_EXPIRES = "SELECT expires FROM {p}queue WHERE name = ?"
EXPIRED_QUEUES = "SELECT name FROM {p}queue WHERE expires IS NOT NULL AND last_used + expires <= ?"
DELETE_QUEUE_MESSAGES = "DELETE FROM {p}message WHERE queue = ?"
DELETE_QUEUE_BINDINGS = "DELETE FROM {p}binding WHERE queue = ?"
DELETE_QUEUE = "DELETE FROM {p}queue WHERE name = ?"
DELETE_QUEUE_CONSUMERS = "DELETE FROM {p}consumer WHERE queue = ?"
ADD_CONSUMER = (
    "INSERT INTO {p}consumer (queue, owner, tag, alive_until) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (queue, owner, tag) DO UPDATE SET alive_until = excluded.alive_until"
)
REMOVE_CONSUMER = "DELETE FROM {p}consumer WHERE queue = ? AND owner = ? AND tag = ?"
KEEP_CONSUMERS = "UPDATE {p}consumer SET alive_until = ? WHERE owner = ?"
LIVE_CONSUMERS = "SELECT count(*) FROM {p}consumer WHERE queue = ? AND alive_until > ?"
# Queues that lose their last live consumer when the dead ones' rows go.
DEAD_CONSUMER_QUEUES = "SELECT DISTINCT queue FROM {p}consumer WHERE alive_until <= ?"
SWEEP_CONSUMERS = "DELETE FROM {p}consumer WHERE alive_until <= ?"
DECLARE_EXCHANGE = (
    "INSERT INTO {p}exchange (name, type, durable, auto_delete) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO NOTHING"
)
EXCHANGE_TYPE = "SELECT type FROM {p}exchange WHERE name = ?"
DELETE_EXCHANGE = "DELETE FROM {p}exchange WHERE name = ?"
DELETE_EXCHANGE_BINDINGS = "DELETE FROM {p}binding WHERE exchange = ?"
BIND = "INSERT OR IGNORE INTO {p}binding (exchange, routing_key, queue) VALUES (?, ?, ?)"
UNBIND = "DELETE FROM {p}binding WHERE exchange = ? AND routing_key = ? AND queue = ?"
BINDINGS = "SELECT queue, exchange, routing_key FROM {p}binding"
#: Tables carried over to a file that replaced ours (routing and who consumes; not messages).
ROUTING_TABLES = ("queue", "exchange", "binding", "consumer")
ROUTING_ROWS = "SELECT * FROM {p}{table}"
ROUTING_INSERT = "INSERT OR IGNORE INTO {p}{table} VALUES ({marks})"
TASK_IDS = (
    "SELECT json_extract(payload, '$.headers.id') FROM {p}message"
    " WHERE queue IN (SELECT value FROM json_each(?))"
)
SWEEP_MESSAGES = "DELETE FROM {p}message WHERE expires_at <= ?"
SWEEP_DEAD_LETTERS = "DELETE FROM {p}dead_letter WHERE dead_at <= ?"

#: Seconds SQLite waits for another connection's write lock before failing.
DEFAULT_BUSY_TIMEOUT = 60.0
#: Bytes the ``-wal`` file is truncated back to after a checkpoint.
DEFAULT_WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: SQLite's passive auto-checkpoint, off: :meth:`Store._bound_wal` checkpoints instead.
WAL_AUTOCHECKPOINT_PAGES = 0
#: Milliseconds a TRUNCATE checkpoint may wait for locks (the API's writers wait as long at most).
CHECKPOINT_BUSY_MS = 5
#: Writes of one process between two looks at the size of the ``-wal`` file.
WAL_CHECK_EVERY = 50
#: Seconds before consumed queues without ``x-expires`` are looked at again.
QUEUE_EXPIRY_RECHECK = 60.0


class PublishBatch:
    """The messages one thread put inside :func:`publish_batch`, written at its end."""

    def __init__(self) -> None:
        self.puts: list[tuple[Store, str, dict[str, Any]]] = []
        #: True once every message put in the batch is committed (at once when none was).
        self.written = False

    def write(self) -> None:
        """Commit the puts, one transaction per file (puts through several connections to one
        file, as Celery's producer pool may make them, go in through the first)."""
        files: dict[tuple[str, str], tuple[Store, list[tuple[str, dict[str, Any]]]]] = {}
        for store, statement, params in self.puts:
            files.setdefault((str(store.path), store.prefix), (store, []))[1].append((statement, params))
        for store, rows in files.values():
            store.put_many(rows)
        self.written = True


_batches = threading.local()


@contextmanager
def publish_batch() -> Iterator[PublishBatch]:
    """Messages this thread publishes inside are written at its end, one transaction per file.

    For a caller that publishes many messages at once (cl_tasks' intake, every new
    row of one scan): the write lock is taken once, not once per message, so the
    API service sharing the file waits for it less often. The messages become
    visible together when the block ends (also when it raises: what was put is
    written, then the error goes on); :attr:`PublishBatch.written` says whether
    that write committed. Publishes to another broker are not held (nothing of
    theirs is put here). Batches do not nest.
    """
    if getattr(_batches, "current", None) is not None:
        raise RuntimeError("publish_batch() does not nest")
    batch = _batches.current = PublishBatch()
    try:
        yield batch
    finally:
        _batches.current = None
        batch.write()


class DatabaseUnavailable(Exception):
    """Raised at connect when the database file cannot be used (path, rights, format)."""


class DatabaseFull(sqlite3.OperationalError):
    """Raised when a write fails because the disk holding the database is full; nothing was written.

    The one "disk full" error of cl_tasks: the broker tables raise it, and so does
    the jobs table (:mod:`cl_tasks.jobs`, on SQLite and PostgreSQL alike). Still an
    ``OperationalError``, so kombu and Celery treat it as a lost connection and try
    again; its message names the file and the fix.
    """


#: A message's place in delivery order: (priority, row id); see :data:`CLAIM`.
Place = tuple[int, int]


def delivery_key(place: Place) -> tuple[int, int]:
    """Sort key of a :data:`Place`: higher priority first, then lower id (publish order)."""
    priority, row_id = place
    return -priority, row_id


def _claim_params(
    queues: Sequence[str], owner: str | None, limit: int, lease: float, before: Place | None
) -> dict[str, Any]:
    now = time.time()
    before_priority, before_id = before if before is not None else (None, None)
    return {
        "queues": json.dumps(list(queues)),
        "queue": queues[0] if len(queues) == 1 else None,
        "now": now,
        "limit": limit,
        "owner": owner,
        "lease_until": now + lease,
        "before_priority": before_priority,
        "before_id": before_id,
    }


@dataclass(frozen=True)
class Claimed:
    """One message taken from a queue: its row, priority and decoded payload (or the error)."""

    row_id: int
    priority: int
    payload: dict[str, Any] | None
    redelivered: bool
    queue: str
    error: str | None = None


@lru_cache(maxsize=4096)
def topic_match(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words.

    (kombu's in-memory topic exchange lets ``stock.#`` miss ``stock``; RabbitMQ
    does not, and neither do we.)
    """
    pattern = binding_key.split(".")
    words = routing_key.split(".")

    @cache
    def match(p: int, w: int) -> bool:
        if p == len(pattern):
            return w == len(words)
        if pattern[p] == "#":
            return any(match(p + 1, rest) for rest in range(w, len(words) + 1))
        if w == len(words):
            return False
        return pattern[p] in ("*", words[w]) and match(p + 1, w + 1)

    return match(0, 0)


def check_path(path: Path) -> None:
    """Raise :class:`DatabaseUnavailable` naming ``path`` and the fix if it cannot be used."""
    folder = path.parent
    if not folder.is_dir():
        raise DatabaseUnavailable(
            f"SQLite broker: the folder {folder} of database {path} does not exist;"
            " create it (mkdir -p) or point the broker URL / DATABASE_URL elsewhere"
        )
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise DatabaseUnavailable(
                f"SQLite broker: database {path} is not readable and writable by this user;"
                " fix its owner or permissions"
            )
        # The SQLite header is checked by SQLite itself ("file is not a database",
        # wrapped in _connect), never by opening the file here: closing any
        # descriptor of the file drops every POSIX lock this process holds on it,
        # and another process could then delete the -wal file under us.
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise DatabaseUnavailable(
            f"SQLite broker: cannot create database {path}: folder {folder} is not writable;"
            " fix its permissions or point the broker URL / DATABASE_URL elsewhere"
        )


class _ProcessState:
    """What a :class:`Store` keeps per process: each thread's connection, the schema made once.

    ``generation`` is that of the file the connections are on (:mod:`transports.replaced`);
    ``conns`` holds every connection made, to abandon them when the file is replaced.
    """

    def __init__(self, watch: replaced.Watch) -> None:
        self.threads = threading.local()
        self.schema_ready = False
        self.schema_lock = threading.Lock()
        self.watch = watch
        self.generation = watch.generation()
        self.conns: list[sqlite3.Connection] = []


class Store:
    """The broker tables in one SQLite file, with a connection per thread and process."""

    def __init__(
        self,
        path: Path,
        *,
        prefix: str = "kombu_",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        synchronous: str = "NORMAL",
        wal_size_limit: int = DEFAULT_WAL_SIZE_LIMIT,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
            raise ValueError(f"table_prefix {prefix!r} must be letters, digits and underscores")
        if synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"synchronous {synchronous!r} must be NORMAL, FULL or EXTRA")
        self.path = path
        self.prefix = prefix
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._wal_size_limit = wal_size_limit
        self._wal_path = f"{path}-wal"
        self._process: PerProcess[_ProcessState] = PerProcess(lambda: _ProcessState(replaced.watch(path)))
        self._sql: dict[str, str] = {}
        self._exchange_types: dict[str, str] = {}
        self._next_sweep = 0.0
        #: Commits made through this Store in this process; with ``data_version``
        #: (which counts other connections' commits) it tells whether anything changed.
        self.local_writes = 0

    # -- connections ------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection, made on first use, after a fork and when the file was replaced."""
        state = self._process.get()
        if state.generation != state.watch.generation():
            state = self._reconnect(state)
        conn: sqlite3.Connection | None = getattr(state.threads, "conn", None)
        if conn is None:
            conn = state.threads.conn = self._connect()
            state.conns.append(conn)
        return conn

    def _reconnect(self, old: _ProcessState) -> _ProcessState:
        """The file was replaced: new connections, with the routing of the old file carried over.

        Queues, exchanges, bindings and consumers live in the file (shared routing), so a
        new file would route nothing until every process declared again; they are copied
        from this thread's old connection (the old file stays readable through it).
        Messages are not: they belonged to the old file's jobs. Old connections are
        abandoned, never closed (:func:`transports.replaced.abandon` says why).
        """
        with old.schema_lock:
            if self._process.get() is not old:
                return self._process.get()
            routing = self._routing(getattr(old.threads, "conn", None))
            for conn in old.conns:
                replaced.abandon(conn)
            self._process.reset()
            state = self._process.get()
        if routing:
            with self.transaction(self.conn) as conn:
                for table, rows in routing.items():
                    marks = ", ".join("?" * len(rows[0]))
                    conn.executemany(ROUTING_INSERT.format(p=self.prefix, table=table, marks=marks), rows)
        return state

    def _routing(self, conn: sqlite3.Connection | None) -> dict[str, list[Any]]:
        if conn is None:
            return {}
        try:
            found = {
                table: conn.execute(ROUTING_ROWS.format(p=self.prefix, table=table)).fetchall()
                for table in ROUTING_TABLES
            }
        except sqlite3.Error as exc:
            logger.warning(
                "SQLite broker: the routing of the replaced %s could not be read: %s", self.path, exc
            )
            return {}
        return {table: rows for table, rows in found.items() if rows}

    def _connect(self) -> sqlite3.Connection:
        if replaced.watch(self.path).gone():
            raise replaced.DatabaseGone(f"SQLite broker: {self.path} was deleted; waiting for it")
        check_path(self.path)
        if not self.path.exists():
            # Owner-only from the start: the file will hold every message.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA journal_size_limit={int(self._wal_size_limit)}")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                raise DatabaseUnavailable(
                    f"SQLite broker: {self.path} is not an SQLite database;"
                    " point the broker URL / DATABASE_URL at a media_store.db file"
                ) from exc
            raise DatabaseUnavailable(
                f"SQLite broker: cannot open {self.path}: {exc};"
                " check that it is an SQLite database on a local disk"
            ) from exc
        conn.create_function("kombu_topic_match", 2, topic_match, deterministic=True)
        self._ensure_schema(conn)
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        state = self._process.get()
        with state.schema_lock:
            if state.schema_ready:
                return
            with self.transaction(conn):
                for statement in SCHEMA:
                    conn.execute(statement.format(p=self.prefix))
            state.schema_ready = True

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        state = self._process.peek()
        conn = None if state is None else getattr(state.threads, "conn", None)
        if conn is not None:
            conn.close()
        self._process.reset()

    def sql(self, statement: str) -> str:
        """``statement`` with this store's table prefix filled in."""
        text = self._sql.get(statement)
        if text is None:
            text = self._sql[statement] = statement.replace("{p}", self.prefix)
        return text

    def _write(self, statement: str, params: Any) -> tuple[list[Any], int]:
        """One write statement as its own transaction; returns its rows and rowcount.

        A lone write statement takes the write lock before it reads anything
        (its first opcode), so it is as safe as ``BEGIN IMMEDIATE`` and costs one
        call instead of three.
        """
        conn = self.conn
        with self._writing(conn):
            cursor = conn.execute(self.sql(statement), params)
            rows = cursor.fetchall()
        self._count_write()
        return rows, cursor.rowcount

    @contextmanager
    def _writing(self, conn: sqlite3.Connection) -> Iterator[None]:
        """A failed write ends its transaction; SQLite's "disk is full" becomes :class:`DatabaseFull`.

        (After a failed COMMIT SQLite may keep the transaction open, and every
        later ``BEGIN`` on the connection would fail.)
        """
        try:
            yield
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise DatabaseFull(
                    f"SQLite broker: cannot write {self.path}: the disk is full;"
                    f" free space on the filesystem of {self.path.parent} (messages wait until then)"
                ) from exc
            raise

    def _count_write(self) -> None:
        self.local_writes += 1
        if self.local_writes % WAL_CHECK_EVERY == 0:
            self._bound_wal()

    def _bound_wal(self) -> None:
        """Past ``wal_size_limit``, bring the ``-wal`` file back to empty without blocking writers.

        First a PASSIVE checkpoint, which never waits for anyone: it copies back
        every frame no reader still needs. Only when that copied them all (no
        reader holds an older snapshot) does a TRUNCATE follow, with a busy
        timeout of :data:`CHECKPOINT_BUSY_MS`: TRUNCATE takes the write lock
        while it waits for readers, so with our usual 60 s timeout one API
        request holding a snapshot would lock every API writer out for as long
        as it reads. Busy now means tried again later: at the next look (every
        :data:`WAL_CHECK_EVERY` writes) or the next sweep. While a reader holds
        an old snapshot the file grows (SQLite cannot rewind it under a
        reader); it returns under the bound at the first look after the
        readers finish.
        """
        try:
            size = os.stat(self._wal_path).st_size
        except FileNotFoundError:
            return
        if size <= self._wal_size_limit:
            return
        conn = self.conn
        try:
            _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames < 0 or copied < frames:
                return  # a reader still needs frames of the log: not now
            conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        except sqlite3.Error as exc:
            # The write before committed: it must not look failed. The next look tries again.
            logger.warning("SQLite broker: checkpoint of %s failed, retried later: %s", self.path, exc)

    @contextmanager
    def transaction(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` write transaction.

        Never a deferred one: a deferred transaction that reads, then writes after
        another connection committed fails with ``SQLITE_BUSY_SNAPSHOT``, which
        ``busy_timeout`` does not retry.
        """
        conn = conn or self.conn
        conn.execute("BEGIN IMMEDIATE")
        with self._writing(conn):
            yield conn
            conn.execute("COMMIT")
        self._count_write()

    def change_token(self) -> tuple[int, int]:
        """A value that differs whenever any connection committed to the file."""
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        return version, self.local_writes

    # -- messages -----------------------------------------------------------

    def put(
        self,
        exchange: str,
        routing_key: str,
        payload: dict[str, Any],
        *,
        priority: int,
        expires_at: float | None,
    ) -> int:
        """Route ``payload`` to queues and store it once per queue; returns how many.

        A message no binding routes (Celery's task events while no monitor listens,
        gossip's queue taking only worker events) is dropped after a read, without
        taking the write lock.
        """
        if exchange and not self.routes(exchange, routing_key):
            return 0
        params = {
            "payload": json.dumps(payload),
            "priority": priority,
            "msg_expires": expires_at,
            "now": time.time(),
            "exchange": exchange,
            "routing_key": routing_key,
            "queue": routing_key,
        }
        statement = PUT if not exchange else ROUTE_BY_TYPE[self.exchange_type(exchange)]
        batch: PublishBatch | None = getattr(_batches, "current", None)
        if batch is not None:
            batch.puts.append((self, statement, params))
            return 1  # routed above; stored when the batch is written
        return self._write(statement, params)[1]

    def put_many(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Store the messages of :meth:`put`'s ``(statement, params)`` in one transaction."""
        with self.transaction() as conn:
            for statement, params in rows:
                conn.execute(self.sql(statement), params)

    def routes(self, exchange: str, routing_key: str) -> bool:
        """Whether a message to ``exchange`` with ``routing_key`` would reach a queue now."""
        statement = self.sql(ROUTED_BY_TYPE[self.exchange_type(exchange)])
        params = {"exchange": exchange, "routing_key": routing_key}
        return self.conn.execute(statement, params).fetchone() is not None

    def heads(self, queues: Sequence[str]) -> dict[str, Place]:
        """The place of the next ready message of each of ``queues`` that has one (a read).

        The cheap look before taking the write lock to claim, and what orders the
        claims of several consumers of one connection (:meth:`Transport.deliver_in_order`).
        """
        params = {"queues": json.dumps(list(queues)), "now": time.time()}
        return {
            queue: (priority, row_id)
            for queue, priority, row_id in self.conn.execute(self.sql(HEADS), params)
        }

    def claim(
        self,
        queues: Sequence[str],
        *,
        owner: str | None,
        limit: int,
        lease: float,
        before: Place | None = None,
    ) -> list[Claimed]:
        """Claim up to ``limit`` messages of ``queues`` for ``owner`` in one transaction.

        They come in delivery order (priority, then publish order, across the
        queues), and only those before ``before``, the next message of another
        consumer of the connection. With ``owner=None`` (no-ack consumers) the
        messages are deleted as they are taken. Rows whose payload is not JSON
        come back with ``error`` set.
        """
        params = _claim_params(queues, owner, limit, lease, before)
        if len(queues) == 1:
            statement = CLAIM if owner else TAKE
        else:
            # Picked by a read, claimed by id: another consumer's claim in between only
            # means fewer rows (the claim checks each row is still ready).
            params["ids"] = self._merged(self.conn, params)
            if params["ids"] == "[]":
                return []
            statement = CLAIM_LISTED if owner else TAKE_LISTED
        rows = self._write(statement, params)[0]
        return self._claimed(rows)

    def _merged(self, conn: sqlite3.Connection, params: dict[str, Any]) -> str:
        """The ids :data:`CLAIMABLE_MERGED` picks, as a JSON list for :data:`CLAIM_LISTED`."""
        return json.dumps([row_id for (row_id,) in conn.execute(self.sql(CLAIMABLE_MERGED), params)])

    def ack_and_claim(
        self,
        ack_ids: Sequence[int],
        queues: Sequence[str],
        *,
        owner: str,
        limit: int,
        lease: float,
        before: Place | None = None,
    ) -> tuple[int, list[Claimed]]:
        """Delete ``ack_ids`` (still ours) and :meth:`claim` up to ``limit`` more, in one transaction.

        Returns how many of the acked rows were still ours, and the claimed messages.
        """
        with self.transaction() as conn:
            acked = conn.execute(self.sql(ACK_MANY), (owner, json.dumps(list(ack_ids)))).rowcount
            params = _claim_params(queues, owner, limit, lease, before)
            statement = CLAIM
            if len(queues) > 1:
                params["ids"] = self._merged(conn, params)
                statement = CLAIM_LISTED
            rows = conn.execute(self.sql(statement), params).fetchall()
        return acked, self._claimed(rows)

    def _claimed(self, rows: list[Any]) -> list[Claimed]:
        rows.sort(key=lambda row: (-row[1], row[0]))
        return [self._decode(row) for row in rows]

    @staticmethod
    def _decode(row: Sequence[Any]) -> Claimed:
        row_id, priority, text, delivery_count, queue = row
        try:
            payload = json.loads(text)
            if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
                raise ValueError("not a kombu message envelope")
        except ValueError as exc:
            return Claimed(row_id, priority, None, False, queue, f"stored payload is not a message: {exc}")
        return Claimed(row_id, priority, payload, delivery_count > 1, queue)

    def ack(self, row_id: int, owner: str) -> bool:
        """Delete a claimed message; False if the lease was lost to another consumer."""
        return self._write(ACK, (row_id, owner))[1] == 1

    def ack_many(self, row_ids: Sequence[int], owner: str) -> int:
        """Delete claimed messages in one statement; returns how many were still ours."""
        return self._write(ACK_MANY, (owner, json.dumps(list(row_ids))))[1]

    def release(self, row_ids: Iterable[int], owner: str) -> None:
        """Make claimed messages visible again at their original place."""
        with self.transaction() as conn:
            conn.executemany(self.sql(RELEASE), [(row_id, owner) for row_id in row_ids])

    def extend(self, owner: str, lease: float) -> int:
        """Push back the lease expiry of every message ``owner`` holds."""
        return self._write(EXTEND, (time.time() + lease, owner))[1]

    def dead_letter(self, row_id: int, owner: str | None, reason: str) -> None:
        """Move one message to the dead-letter table with ``reason``."""
        with self.transaction() as conn:
            conn.execute(self.sql(DEAD_LETTER), (reason, time.time(), row_id, owner))
            conn.execute(self.sql(DELETE_MESSAGE), (row_id, owner))

    def dead_letter_payload(self, queue: str, payload: dict[str, Any], reason: str) -> None:
        """Record a message already taken off its queue (no-ack) as a dead letter."""
        self._write(DEAD_LETTER_PAYLOAD, (queue, json.dumps(payload), reason, time.time()))

    def task_ids(self, queues: Iterable[str]) -> set[str]:
        """Celery task ids (header ``id``) of every message of ``queues``, ready or taken."""
        rows = self.conn.execute(self.sql(TASK_IDS), (json.dumps(list(queues)),))
        return {str(task_id) for (task_id,) in rows if task_id is not None}

    def size(self, queue: str) -> int:
        row = self.conn.execute(self.sql(SIZE), {"queue": queue, "now": time.time()}).fetchone()
        return int(row[0])

    def purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue`` (claimed ones stay, as in AMQP)."""
        return self._write(PURGE, (queue, time.time()))[1]

    # -- entities -------------------------------------------------------------

    def declare_queue(
        self, name: str, *, message_ttl: float | None, expires: float | None, auto_delete: bool
    ) -> None:
        now = time.time()
        with self.transaction() as conn:
            self._drop_if_expired(conn, name, now)
            conn.execute(
                self.sql(DECLARE_QUEUE),
                {
                    "name": name,
                    "message_ttl": message_ttl,
                    "expires": expires,
                    "auto_delete": int(auto_delete),
                    "now": now,
                },
            )

    def _drop_if_expired(self, conn: sqlite3.Connection, name: str, now: float) -> None:
        if conn.execute(self.sql(QUEUE_EXISTS), {"name": name, "now": now}).fetchone() is None:
            self._drop_queue(conn, name)

    def _drop_queue(self, conn: sqlite3.Connection, name: str) -> None:
        for statement in (DELETE_QUEUE_MESSAGES, DELETE_QUEUE_BINDINGS, DELETE_QUEUE_CONSUMERS, DELETE_QUEUE):
            conn.execute(self.sql(statement), (name,))

    def _drop_if_unconsumed(self, conn: sqlite3.Connection, name: str, now: float) -> bool:
        """Drop auto-delete queue ``name`` if no live consumer is left; whether it was dropped."""
        auto_delete = conn.execute(self.sql(QUEUE_AUTO_DELETE), (name,)).fetchone()
        if not (auto_delete and auto_delete[0]):
            return False
        if conn.execute(self.sql(LIVE_CONSUMERS), (name, now)).fetchone()[0]:
            return False
        self._drop_queue(conn, name)
        return True

    def has_queue(self, name: str) -> bool:
        query = self.sql(QUEUE_EXISTS)
        return self.conn.execute(query, {"name": name, "now": time.time()}).fetchone() is not None

    # -- consumers ------------------------------------------------------------

    def add_consumer(self, queue: str, owner: str, tag: str, *, ttl: float) -> None:
        """Record that ``owner``'s consumer ``tag`` consumes ``queue`` (alive for ``ttl`` s)."""
        self._write(ADD_CONSUMER, (queue, owner, tag, time.time() + ttl))

    def remove_consumer(self, queue: str, owner: str, tag: str) -> bool:
        """Forget one consumer; an auto-delete queue left without live ones is dropped (True)."""
        with self.transaction() as conn:
            conn.execute(self.sql(REMOVE_CONSUMER), (queue, owner, tag))
            return self._drop_if_unconsumed(conn, queue, time.time())

    def keep_consumers(self, owner: str, ttl: float) -> None:
        """Push back the expiry of every consumer row of ``owner`` (its process lives)."""
        self._write(KEEP_CONSUMERS, (time.time() + ttl, owner))

    def consumer_count(self, queue: str) -> int:
        """Live consumers of ``queue``, in every process."""
        row = self.conn.execute(self.sql(LIVE_CONSUMERS), (queue, time.time())).fetchone()
        return int(row[0])

    def delete_queue(self, name: str) -> None:
        with self.transaction() as conn:
            self._drop_queue(conn, name)

    def touch_queues(self, names: Iterable[str]) -> float:
        """Mark consumed queues as in use so their ``x-expires`` does not run out.

        Returns the seconds until they need it again (a quarter of the shortest
        expiry; a minute when none of them expires).
        """
        names = list(names)
        query = self.sql(QUEUE_EXPIRES)
        expiries = [row[0] for name in names for row in self.conn.execute(query, (name,)) if row[0]]
        if not expiries:
            return QUEUE_EXPIRY_RECHECK
        now = time.time()
        with self.transaction() as conn:
            conn.executemany(self.sql(TOUCH_QUEUE), [(now, name) for name in names])
        return max(float(min(expiries)) / 4, 0.05)

    def declare_exchange(self, name: str, type_: str, *, durable: bool, auto_delete: bool) -> str:
        """Create the exchange if missing; returns its type (the existing one if it was there)."""
        self._write(DECLARE_EXCHANGE, (name, type_, int(durable), int(auto_delete)))
        self._exchange_types.pop(name, None)
        return self.exchange_type(name, default=type_)

    def exchange_type(self, name: str, default: str = "direct") -> str:
        """The type of exchange ``name`` (cached: an exchange's type never changes)."""
        cached = self._exchange_types.get(name)
        if cached is None:
            row = self.conn.execute(self.sql(EXCHANGE_TYPE), (name,)).fetchone()
            if row is None:
                return default
            cached = self._exchange_types[name] = row[0]
        return cached

    def has_exchange(self, name: str) -> bool:
        return self.conn.execute(self.sql(EXCHANGE_TYPE), (name,)).fetchone() is not None

    def delete_exchange(self, name: str) -> None:
        with self.transaction() as conn:
            conn.execute(self.sql(DELETE_EXCHANGE_BINDINGS), (name,))
            conn.execute(self.sql(DELETE_EXCHANGE), (name,))
        self._exchange_types.pop(name, None)

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        self._write(BIND, (exchange, routing_key, queue))

    def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        self._write(UNBIND, (exchange, routing_key, queue))

    def bindings(self) -> list[tuple[str, str, str]]:
        return [tuple(row) for row in self.conn.execute(self.sql(BINDINGS))]

    # -- upkeep -------------------------------------------------------------

    def sweep_if_due(self, *, interval: float, dead_letter_retention: float) -> None:
        """Run :meth:`sweep` if ``interval`` seconds passed since this process last did."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + interval
            self.sweep(dead_letter_retention=dead_letter_retention)

    def sweep(self, *, dead_letter_retention: float) -> int:
        """Delete expired messages and queues, dead consumers, old dead letters; checkpoint the WAL.

        An auto-delete queue whose last consumer died (its row ran out) goes too.
        """
        now = time.time()
        with self.transaction() as conn:
            removed = conn.execute(self.sql(SWEEP_MESSAGES), (now,)).rowcount
            for (name,) in conn.execute(self.sql(EXPIRED_QUEUES), (now,)).fetchall():
                self._drop_queue(conn, name)
                removed += 1
            orphaned = conn.execute(self.sql(DEAD_CONSUMER_QUEUES), (now,)).fetchall()
            conn.execute(self.sql(SWEEP_CONSUMERS), (now,))
            removed += sum(self._drop_if_unconsumed(conn, name, now) for (name,) in orphaned)
            conn.execute(self.sql(SWEEP_DEAD_LETTERS), (now - dead_letter_retention,))
        self._bound_wal()
        return removed
