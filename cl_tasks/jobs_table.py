"""The ``jobs`` table as the API service made it: its era, its columns, what a new row must fill.

The API owns ``jobs`` and makes it with its alembic migration (``alembic upgrade
head``). Three eras of its DDL exist (``tests/fixtures/cl_server/``):

* **A** (one ``media_store.db``): every NOT NULL column has *no* server
  default; the API fills ``progress`` 0, ``retry_count`` 0, ``max_retries`` 3.
* **B**: adds ``priority INTEGER NOT NULL`` (the API's routes take 0..10).
* **C** (upstream's current model, often a ``compute.db``): ``params`` and
  ``output`` are JSON columns, ``task_output`` is renamed ``output``, and
  ``updated_at`` (ms) is added.

:func:`reflect` reads the table as it is and returns its :class:`Layout`: a
SQLAlchemy table whose column *keys* are our names (``task_output`` whatever
the column is called), the values a new row must be given (the API's own, for
every NOT NULL column without a default), and which optional columns exist
(``priority``, ``created_by``, ``retry_count``/``max_retries``, ``updated_at``).
The table is never altered. A table lacking a column the worker needs, or with
a NOT NULL column nobody could fill, is refused with one line naming it.

Start order (decided): the worker never creates ``jobs`` at start, so the
API's migration succeeds whether the worker started before or after it. Until
the table exists, intake waits (one log line). In a standalone setup (no API
at all) the first Celery-side submission (``.delay``, ``submit_job``, ``cl-tasks
submit``) creates it with the era-A DDL (:data:`jobs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    cast,
    inspect,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

#: What the API fills in Python for the NOT NULL columns that have no server default.
API_DEFAULTS: dict[str, int] = {"progress": 0, "retry_count": 0, "max_retries": 3, "priority": 5}
#: Columns the worker reads or writes (besides the output column); the table must have them.
REQUIRED_COLUMNS = (
    "id",
    "job_id",
    "task_type",
    "params",
    "status",
    "progress",
    "started_at",
    "completed_at",
    "error_message",
)
#: The output column's name: era A/B ``task_output``, era C ``output``.
OUTPUT_COLUMNS = ("task_output", "output")
#: Columns used when the table has them.
OPTIONAL_COLUMNS = ("created_at", "created_by", "priority", "retry_count", "max_retries", "updated_at")
#: Our names of the integer columns (the ``*_at`` ones are BIGINT milliseconds).
INTEGERS = frozenset({"id", *API_DEFAULTS})
#: Columns every insert of ours gives a value (so their NOT NULL needs no default).
INSERTED = ("job_id", "task_type", "params", "status", "created_at", *API_DEFAULTS)

metadata = MetaData()
#: The era-A ``jobs`` table, created only by the first Celery-side submission when no API made one.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", String, nullable=False),
    Column("task_type", String, nullable=False),
    Column("params", Text, nullable=False),
    Column("status", String, nullable=False),
    Column("progress", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("task_output", Text),
    Column("error_message", Text),
    Column("retry_count", Integer, nullable=False),
    Column("max_retries", Integer, nullable=False),
    Column("created_by", String),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_created_by", "created_by"),
    Index("ix_jobs_job_id", "job_id", unique=True),
    Index("ix_jobs_status", "status"),
)


def keyed_table(name: str, metadata: MetaData, key: str, *columns: Column[Any]) -> Table:
    """A table of ours: a text primary key ``key`` and ``columns`` (never one of the API's)."""
    return Table(name, metadata, Column(key, Text, primary_key=True), *columns)


#: Our two tables beside ``jobs`` (created at start when missing).
ours = MetaData()
#: Who works on a ``processing`` job and until when (epoch seconds).
leases = keyed_table(
    "cl_tasks_job_lease",
    ours,
    "job_id",
    Column("owner", Text, nullable=False),
    Column("expires_at", Float, nullable=False),
)
#: Jobs whose message is on its way (reserved) or in the broker (published).
intake = keyed_table(
    "cl_tasks_intake",
    ours,
    "job_id",
    Column("reserved_at", Float, nullable=False),
    Column("published_at", Float),
)


#: Job priorities the API's routes accept (higher runs first); brokers have 0-9.
JOB_PRIORITIES = range(11)


def broker_priority(job_priority: int) -> int:
    """The broker priority (0-9) of a job priority (0-10): 10 runs before 9, 1 and 0 share 0."""
    return max(0, min(9, job_priority - 1))


class JsonText(TypeDecorator[str]):
    """A JSON column (era C) that we write as JSON text, on SQLite as text, on PostgreSQL as ``json``.

    (psycopg binds a str as VARCHAR, which PostgreSQL refuses for a ``json`` column;
    reads go through ``CAST(… AS TEXT)``, see :meth:`Layout.read`.)
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSON())
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "postgresql" and isinstance(value, str):
            return json.loads(value)  # the JSON type encodes it again
        return value


class JobsTableError(RuntimeError):
    """Raised when the ``jobs`` table cannot be worked with (a column missing or unfillable)."""


class JobsTableMissing(JobsTableError):
    """Raised when there is no ``jobs`` table (yet): the API service has not made it."""


@dataclass(frozen=True)
class Layout:
    """The ``jobs`` table as found: keys are our column names, whatever the table calls them."""

    table: Table
    era: str
    #: Our names of the columns present.
    present: frozenset[str]
    #: Our names of the columns stored as JSON (era C).
    json_columns: frozenset[str]

    def has(self, name: str) -> bool:
        return name in self.present

    def read(self, name: str) -> ColumnElement[Any]:
        """Column ``name`` as its raw text (a JSON column is read as text, never decoded)."""
        column = self.table.c[name]
        return (cast(column, Text) if name in self.json_columns else column).label(name)

    def new_row(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` plus the API's values for the columns present, minus those absent."""
        row = {name: value for name, value in API_DEFAULTS.items() if self.has(name)}
        row.update({name: value for name, value in values.items() if self.has(name)})
        return row


def reflect(conn: Connection) -> Layout:
    """The :class:`Layout` of the ``jobs`` table ``conn`` sees; raises :class:`JobsTableError`."""
    where = conn.engine.url.render_as_string(hide_password=True)
    inspector = inspect(conn)
    if not inspector.has_table("jobs"):
        raise JobsTableMissing(f"there is no jobs table in {where} yet")
    found = {column["name"]: column for column in inspector.get_columns("jobs")}
    output = next((name for name in OUTPUT_COLUMNS if name in found), None)
    missing = [name for name in REQUIRED_COLUMNS if name not in found]
    if output is None:
        missing.append("task_output (or output)")
    if missing:
        raise JobsTableError(
            f"the jobs table of {where} lacks column(s) {', '.join(missing)}; cl_tasks needs the"
            " cl_server schema (tests/fixtures/cl_server/jobs_era_a.sql): let the API service create it"
        )
    known = {*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *OUTPUT_COLUMNS}
    unfillable = [
        name
        for name, column in found.items()
        if name not in known and not column["nullable"] and column.get("default") is None
    ]
    if unfillable:
        raise JobsTableError(
            f"the jobs table of {where} has NOT NULL column(s) {', '.join(unfillable)} without a default;"
            " cl_tasks cannot fill them when it submits a job: give them a server default"
        )
    columns = []
    json_columns = set()
    for name in (*REQUIRED_COLUMNS, output, *OPTIONAL_COLUMNS):
        assert name is not None
        if name not in found:
            continue
        key = "task_output" if name == output else name
        if "JSON" in str(found[name]["type"]).upper():
            json_columns.add(key)
        column_type: Any = BigInteger if key.endswith("_at") else Integer if key in INTEGERS else Text
        if key in json_columns:
            column_type = JsonText
        columns.append(Column(name, column_type, key=key, primary_key=name == "id"))
    table = Table("jobs", MetaData(), *columns)
    era = "C" if output == "output" else "B" if "priority" in found else "A"
    return Layout(table, era, frozenset(table.c.keys()), frozenset(json_columns))
