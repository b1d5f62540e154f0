"""Celery results in the cl_tasks database: one key/value table, one statement per write.

The default ``result_backend`` (``cl_tasks.results:ResultBackend``). It keeps
Celery's result documents in ``cl_tasks_result`` beside ``jobs`` in
``DATABASE_URL`` (SQLite or PostgreSQL, through SQLAlchemy Core and the same
engine as the jobs table). Celery's own SQLAlchemy backend (``db+sqlite://``)
also works but costs a query, an ORM session and a deferred transaction per
state change; this one is an upsert. Results expire after ``result_expires``
(Celery's default: one day) and are removed by ``celery.backend_cleanup``.

A compute job's SUCCESS document is written by the job's own completing
transaction (:func:`success_writer`), so the row turning ``completed`` and the
result Celery clients wait for land together, in one write instead of two; the
tracer's later store of the same SUCCESS is then skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from celery import states
from celery.backends.base import KeyValueStoreBackend
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import Column, Connection, Float, MetaData, Text, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from cl_tasks.jobs import create_tables, job_store
from cl_tasks.jobs_table import keyed_table

metadata = MetaData()
results = keyed_table(
    "cl_tasks_result", metadata, "key", Column("value", Text, nullable=False), Column("expires_at", Float)
)


@cache
def _upsert_statement(dialect_name: str) -> Any:
    """The upsert of one result document, built once per dialect (building costs more than running)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    upsert = dialect.insert(results)
    return upsert.on_conflict_do_update(
        index_elements=[results.c.key],
        set_={"value": upsert.excluded.value, "expires_at": upsert.excluded.expires_at},
    )


#: Task ids (of this process) whose SUCCESS document the job's transaction wrote.
_written_with_job: set[str] = set()


class ResultBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery key/value result backend on ``cl_tasks_result``."""

    key_t = staticmethod(bytes_to_str)
    #: The engine our result table was made on (a replaced database gets a new one).
    _ready_on: Any = None

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

    def _engine(self) -> Any:
        engine = job_store().engine
        if self._ready_on is not engine:
            create_tables(metadata, engine)
            self._ready_on = engine
        return engine

    def get(self, key: str) -> str | None:
        with self._engine().connect() as conn:
            value = conn.execute(select(results.c.value).where(results.c.key == key)).scalar()
        return None if value is None else str(value)

    def mget(self, keys: Sequence[str]) -> list[str | None]:
        with self._engine().connect() as conn:
            found = dict(conn.execute(select(results.c.key, results.c.value).where(results.c.key.in_(keys))))
        return [found.get(key) for key in keys]

    def set(self, key: str, value: Any) -> None:
        engine = self._engine()
        with engine.begin() as conn:
            conn.execute(_upsert_statement(engine.dialect.name), self._values(key, value))

    def _values(self, key: str, value: Any) -> dict[str, Any]:
        expires = self.expires
        return {
            "key": key,
            "value": bytes_to_str(value),
            "expires_at": None if not expires else time.time() + float(expires),
        }

    def delete(self, key: str) -> None:
        with self._engine().begin() as conn:
            conn.execute(delete(results).where(results.c.key == key))

    def cleanup(self) -> None:
        """Remove expired results (run by ``celery.backend_cleanup``)."""
        with self._engine().begin() as conn:
            conn.execute(delete(results).where(results.c.expires_at < time.time()))
