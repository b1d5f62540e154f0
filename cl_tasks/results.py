"""Celery results in the cl_tasks database: one key/value table, one statement per write.

The default ``result_backend`` (``cl_tasks.results:ResultBackend``). It keeps
Celery's result documents in ``cl_tasks_result`` beside ``jobs`` in
``DATABASE_URL`` (SQLite or PostgreSQL, through SQLAlchemy Core and the same
engine as the jobs table). Celery's own SQLAlchemy backend (``db+sqlite://``)
also works but costs a query, an ORM session and a deferred transaction per
state change; this one is an upsert. Results expire after ``result_expires``
(Celery's default: one day): an expired key reads as missing at once, and
``celery.backend_cleanup`` removes the rows.

A compute job's SUCCESS document is written by the job's own completing
transaction (:func:`success_writer`), so the row turning ``completed`` and the
result Celery clients wait for land together, in one write instead of two; the
tracer's later store of the same SUCCESS is then skipped.

What groups and chords need (decided, after Celery's Redis backend):

* ``mget`` (one ``SELECT … IN``) and ``supports_native_join``: ``join_native``,
  ``get_many`` and ``iter_native`` read every result of a group in one query.
  Waiting clients look every :data:`POLL_INTERVAL` s (Celery's 0.5 s default is
  capped), since a look is one indexed read.
* An atomic counter, ``incr``: one ``INSERT … ON CONFLICT DO UPDATE … RETURNING``
  on both databases (SQLite >= 3.35). So chords count their header parts here
  (``implements_incr``) and never go through Celery's ``chord_unlock`` task,
  which polls every second: the body is sent by the worker that stores the last
  header result, and a failed header fails the chord at that same moment.
* Each header part is counted once, keyed by task id and header index (an
  ``acks_late`` redelivery runs a task twice), and its result is kept with it, so
  the last part reads the whole header in one query, in header order. One
  worker claims the body (an insert that only one transaction can make), and a
  ``done`` marker keeps late duplicates from counting again. A header holding
  groups is saved as a ``GroupResult`` and joined instead, keeping its shape.
  All of a part's steps run in one transaction (on SQLite ``BEGIN IMMEDIATE``:
  parts of one chord are serialised; on PostgreSQL the counter's row lock does it).
* ``Task.add_to_chord`` grows the expected count; re-applying a frozen chord
  (same group id) starts a new count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

from celery import states
from celery.backends.base import KeyValueStoreBackend, _create_chord_error_with_cause
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import GroupResult, allow_join_result
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import Column, Connection, Float, Integer, MetaData, Text, cast, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from cl_tasks.jobs import create_tables, job_store
from cl_tasks.jobs_table import keyed_table

logger = get_logger(__name__)

metadata = MetaData()
results = keyed_table(
    "cl_tasks_result", metadata, "key", Column("value", Text, nullable=False), Column("expires_at", Float)
)

#: Longest wait, in seconds, between two looks of a client waiting for results.
POLL_INTERVAL = 0.05
#: The value of a chord's claim key once its body was sent.
CHORD_DONE = "done"


def _dialect(dialect_name: str) -> Any:
    return postgresql if dialect_name == "postgresql" else sqlite


@cache
def _upsert_statement(dialect_name: str) -> Any:
    """The upsert of one result document, built once per dialect (building costs more than running)."""
    upsert = _dialect(dialect_name).insert(results)
    return upsert.on_conflict_do_update(
        index_elements=[results.c.key],
        set_={"value": upsert.excluded.value, "expires_at": upsert.excluded.expires_at},
    )


@cache
def _incr_statement(dialect_name: str) -> Any:
    """``key`` += 1 (created at 1), returning the new count: atomic on both databases."""
    upsert = _dialect(dialect_name).insert(results)
    counted = cast(cast(results.c.value, Integer) + 1, Text)
    return upsert.on_conflict_do_update(
        index_elements=[results.c.key], set_={"value": counted, "expires_at": upsert.excluded.expires_at}
    ).returning(results.c.value)


@cache
def _add_statement(dialect_name: str) -> Any:
    """Insert ``key`` unless it exists; returns a row only when this call inserted it."""
    insert = _dialect(dialect_name).insert(results)
    return insert.on_conflict_do_nothing(index_elements=[results.c.key]).returning(results.c.key)


def _live(now: float) -> Any:
    return or_(results.c.expires_at.is_(None), results.c.expires_at > now)


#: Task ids (of this process) whose SUCCESS document the job's transaction wrote.
_written_with_job: set[str] = set()


class ResultBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery key/value result backend on ``cl_tasks_result``, with chord counting."""

    key_t = staticmethod(bytes_to_str)
    supports_native_join = True
    implements_incr = True
    #: The engine whose tables exist (a new process, new settings or a replaced database
    #: make a new engine).
    _tables_on: Any = None

    def success_writer(self, task_id: str, output: Any, request: Any) -> Callable[[Connection], Any]:
        """A write of ``task_id``'s SUCCESS document, to run inside another transaction.

        Call :meth:`written_with_job` once that transaction committed: the tracer's
        own store of the same document is then skipped.
        """
        meta = self._get_result_meta(result=output, state=states.SUCCESS, traceback=None, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        values = self._values(self.get_key_for_task(task_id), self.encode(meta))
        self._engine()  # creates the table outside the job's transaction
        return lambda conn: conn.execute(_upsert_statement(conn.engine.dialect.name), values)

    @staticmethod
    def written_with_job(task_id: str) -> None:
        _written_with_job.add(task_id)

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        if state == states.SUCCESS and task_id in _written_with_job:
            _written_with_job.discard(task_id)
            return result
        return super()._store_result(task_id, result, state, traceback, request, **kwargs)

    # -- the key/value store ------------------------------------------------------------

    def _engine(self) -> Any:
        engine = job_store().engine
        if self._tables_on is not engine:
            create_tables(metadata, engine)
            self._tables_on = engine
        return engine

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A read-only connection (on SQLite a plain ``BEGIN``: it never holds writers out)."""
        with self._engine().connect() as conn:
            yield conn.execution_options(cl_read_only=True)

    def get(self, key: str) -> str | None:
        with self._reading() as conn:
            value = conn.execute(
                select(results.c.value).where(results.c.key == key, _live(time.time()))
            ).scalar()
        return None if value is None else str(value)

    def mget(self, keys: Sequence[str]) -> list[str | None]:
        """The values of ``keys`` in their order (``None`` where missing), in one query."""
        wanted = [bytes_to_str(key) for key in keys]
        with self._reading() as conn:
            rows = conn.execute(
                select(results.c.key, results.c.value).where(results.c.key.in_(wanted), _live(time.time()))
            ).all()
        found = {str(key): str(value) for key, value in rows}
        return [found.get(key) for key in wanted]

    def set(self, key: str, value: Any) -> None:
        self._put(key, value, self.expires)

    def _put(self, key: str, value: Any, expires: float | None) -> None:
        engine = self._engine()
        with engine.begin() as conn:
            conn.execute(_upsert_statement(engine.dialect.name), self._values(key, value, expires))

    def _values(self, key: str, value: Any, expires: float | None = None) -> dict[str, Any]:
        if expires is None:
            expires = self.expires
        return {"key": key, "value": bytes_to_str(value), "expires_at": _deadline(expires)}

    def incr(self, key: str) -> int:
        """Add 1 to the counter ``key`` (a missing key counts from 0); the new value."""
        engine = self._engine()
        with engine.begin() as conn:
            return self._incr(conn, key, None)

    def _incr(self, conn: Connection, key: str, expires: float | None) -> int:
        """``incr`` in ``conn``'s transaction; the key expires ``expires`` s from now (``None``: never)."""
        values = {"key": key, "value": "1", "expires_at": _deadline(expires)}
        return int(conn.execute(_incr_statement(conn.engine.dialect.name), values).scalar_one())

    def expire(self, key: str, value: float | None) -> None:
        """``key`` expires ``value`` s from now (0 or ``None``: never)."""
        with self._engine().begin() as conn:
            conn.execute(update(results).where(results.c.key == key).values(expires_at=_deadline(value)))

    def delete(self, key: str) -> None:
        with self._engine().begin() as conn:
            conn.execute(delete(results).where(results.c.key == key))

    def cleanup(self) -> None:
        """Remove expired results (run by ``celery.backend_cleanup``)."""
        with self._engine().begin() as conn:
            conn.execute(delete(results).where(results.c.expires_at < time.time()))

    # -- waiting ----------------------------------------------------------------------

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Callable[[], Any] | None = None,
    ) -> Any:
        """Celery's poll loop, looking every :data:`POLL_INTERVAL` s at most.

        ``on_interval`` (``get()``'s check of the parents) runs after each look, also
        the look that finds the result ready, as Celery's Redis backend does: a chord
        whose header failed raises the header's error (stored before the body's
        ChordError), not the ChordError.
        """
        self._ensure_not_eager()
        interval = min(interval, POLL_INTERVAL)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            meta = self.get_task_meta(task_id)
            if on_interval is not None:
                on_interval()
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout("The operation timed out.")
            time.sleep(interval)

    def get_many(
        self, task_ids: Any, timeout: float | None = None, interval: float | None = 0.5, **kwargs: Any
    ) -> Any:
        return super().get_many(task_ids, timeout, min(interval or POLL_INTERVAL, POLL_INTERVAL), **kwargs)

    # -- chords -------------------------------------------------------------------------

    def _chord_key(self, group_id: str, part: str) -> str:
        return str(self.get_key_for_group(group_id, part))

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        """A chord of ``chord_size`` header parts starts (again, for a re-applied frozen chord)."""
        self.delete(self._chord_key(group_id, ".c"))
        self._put(self._chord_key(group_id, ".s"), str(chord_size), self.chord_expires)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        """One more header part (``Task.add_to_chord``)."""
        with self._engine().begin() as conn:
            self._incr(conn, self._chord_key(group_id, ".t"), self.chord_expires)

    def _apply_chord_incr(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Celery's ``apply_chord`` when ``implements_incr``: no ``chord_unlock`` task is sent.

        A header holding groups is saved, so the body gets the results in its shape.
        """
        header = self.app.GroupResult(*header_result_args)
        if any(isinstance(each, GroupResult) for each in header.results):
            encoded = self.encode({"result": header.as_tuple()})
            self._put(self.get_key_for_group(header.id), encoded, self.chord_expires)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        """Count this header part; the worker that counts the last one sends the body."""
        task_id, group_id, index = request.id, request.group, request.group_index
        if not group_id or not task_id:
            return
        entry = self.encode([index, task_id, state, self.encode_result(result, state)])
        if not self._count_part(group_id, f"{index}:{task_id}", entry):
            return
        callback = maybe_signature(request.chord, app=self.app)
        try:
            header = self._chord_header(group_id)
        except ChordError as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            self._chord_failed(group_id, callback, exc)
            return
        except Exception as exc:  # the body must fail, not wait for ever
            logger.exception("Chord %r raised: %r", group_id, exc)
            self._chord_failed(group_id, callback, ChordError(f"Join error: {exc!r}"))
            return
        try:
            self.app.amqp._retry_publish(callback.delay, header)
        except Exception as exc:  # the body must fail, not wait for ever
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))
        finally:
            self._chord_done(group_id)

    def _count_part(self, group_id: str, member: str, entry: str) -> bool:
        """Record one header part once; whether this call completed the header and claimed its body."""
        claim, parts = self._chord_key(group_id, ".c"), self._chord_key(group_id, ".d:")
        expires_at = _deadline(self.chord_expires)
        engine = self._engine()
        dialect = engine.dialect.name
        with engine.begin() as conn:
            if self._read(conn, claim) == CHORD_DONE:
                return False  # a late duplicate of a chord whose body was sent
            added = {"key": parts + member, "value": entry, "expires_at": expires_at}
            if conn.execute(_add_statement(dialect), added).first() is not None:
                ready = self._incr(conn, self._chord_key(group_id, ".j"), self.chord_expires)
            else:
                ready = int(self._read(conn, self._chord_key(group_id, ".j")) or 0)
            size = self._read(conn, self._chord_key(group_id, ".s"))
            grown = int(self._read(conn, self._chord_key(group_id, ".t")) or 0)
            if size is None or ready != int(size) + grown:
                return False
            claimed = {"key": claim, "value": "claimed", "expires_at": expires_at}
            return conn.execute(_add_statement(dialect), claimed).first() is not None

    @staticmethod
    def _read(conn: Connection, key: str) -> str | None:
        value = conn.execute(select(results.c.value).where(results.c.key == key)).scalar()
        return None if value is None else str(value)

    def _chord_header(self, group_id: str) -> list[Any]:
        """The header's results in header order; a failed part raises :class:`ChordError`."""
        saved = GroupResult.restore(group_id, app=self.app, backend=self)
        if saved is not None:
            saved.on_ready()
            with allow_join_result():
                return list(
                    saved.join_native(timeout=self.app.conf.result_chord_join_timeout, propagate=True)
                )
        prefix = self._chord_key(group_id, ".d:")
        with self._reading() as conn:
            stored = conn.execute(
                select(results.c.value).where(results.c.key.startswith(prefix, autoescape=True))
            ).scalars()
            entries = [self.decode(value) for value in stored]
        entries.sort(key=lambda entry: (entry[0] is None, entry[0] or 0))
        return [self._unpack_part(*entry) for entry in entries]

    def _unpack_part(self, _index: Any, task_id: str, state: str, value: Any) -> Any:
        if state in states.EXCEPTION_STATES:
            value = self.exception_to_python(value)
        if state in states.PROPAGATE_STATES:
            raise _create_chord_error_with_cause(f"Dependency {task_id} raised {value!r}", value)
        return value

    def _chord_failed(self, group_id: str, callback: Any, exc: ChordError) -> None:
        """Fail the body; drop the size, so a late copy of a header task cannot fail it again."""
        try:
            self.chord_error_from_stack(callback, exc)
        finally:
            self.delete(self._chord_key(group_id, ".s"))

    def _chord_done(self, group_id: str) -> None:
        """The body was sent: remove the chord's counters and parts, keep the ``done`` marker."""
        keep = self._chord_key(group_id, ".c")
        doomed = [self._chord_key(group_id, part) for part in (".j", ".s", ".t")]
        engine = self._engine()
        with engine.begin() as conn:
            conn.execute(delete(results).where(results.c.key.in_(doomed)))
            conn.execute(
                delete(results).where(
                    results.c.key.startswith(self._chord_key(group_id, ".d:"), autoescape=True)
                )
            )
            marker = {"key": keep, "value": CHORD_DONE, "expires_at": _deadline(self.chord_expires)}
            conn.execute(_upsert_statement(engine.dialect.name), marker)


def _deadline(expires: float | None) -> float | None:
    """The epoch second ``expires`` s from now (``None`` or 0: never)."""
    return None if not expires else time.time() + float(expires)
