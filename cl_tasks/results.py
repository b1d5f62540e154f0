"""Celery results in the cl_tasks database: one key/value table, one statement per write.

The default ``result_backend`` (``cl_tasks.results:ResultBackend``). It keeps
Celery's result documents in ``cl_tasks_result`` beside ``jobs`` in
``DATABASE_URL`` (SQLite or PostgreSQL, through SQLAlchemy Core and the same
engine as the jobs table). Celery's own SQLAlchemy backend (``db+sqlite://``)
also works but costs a query, an ORM session and a deferred transaction per
state change; this one is an upsert. Results expire after ``result_expires``
(Celery's default: one day) and are removed by ``celery.backend_cleanup``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import Column, Float, MetaData, Table, Text, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from cl_tasks.jobs import job_store

metadata = MetaData()
results = Table(
    "cl_tasks_result",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("expires_at", Float),
)


class ResultBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery key/value result backend on ``cl_tasks_result``."""

    key_t = staticmethod(bytes_to_str)
    _ready = False

    def _engine(self) -> Any:
        engine = job_store().engine
        if not self._ready:
            metadata.create_all(engine, checkfirst=True)
            self._ready = True
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
        expires = self.expires
        values = {
            "key": key,
            "value": bytes_to_str(value),
            "expires_at": None if not expires else time.time() + float(expires),
        }
        engine = self._engine()
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        upsert = dialect.insert(results).values(**values)
        upsert = upsert.on_conflict_do_update(
            index_elements=[results.c.key],
            set_={"value": values["value"], "expires_at": values["expires_at"]},
        )
        with engine.begin() as conn:
            conn.execute(upsert)

    def delete(self, key: str) -> None:
        with self._engine().begin() as conn:
            conn.execute(delete(results).where(results.c.key == key))

    def cleanup(self) -> None:
        """Remove expired results (run by ``celery.backend_cleanup``)."""
        with self._engine().begin() as conn:
            conn.execute(delete(results).where(results.c.expires_at < time.time()))
