"""The cl_server API's own ``jobs`` DDL (tests/fixtures/cl_server/), applied as the API applies it.

Every test of the jobs layer builds its table from these files, never from a
friendlier DDL of ours: NOT NULL columns have no server defaults, era B adds
``priority``, era C renames ``task_output`` to ``output`` and adds ``updated_at``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cl_server"
ERAS = ("a", "b", "c")


def ddl(era: str = "a") -> list[str]:
    """The statements of era ``era``'s DDL, in order."""
    text = (FIXTURES / f"jobs_era_{era}.sql").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


def create_sqlite(path: Path, era: str = "a") -> None:
    """Apply era ``era``'s DDL to the SQLite file ``path`` (WAL), as the API's migration does."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in ddl(era):
            conn.execute(statement)
    conn.close()


def create_postgresql(url: str, era: str = "a") -> None:
    """Apply era ``era``'s DDL on PostgreSQL (its ``id`` made an identity, as alembic does)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in ddl(era):
            conn.execute(statement.replace("id INTEGER NOT NULL,", "id SERIAL NOT NULL,"))


def api_row(job_id: str, task_type: str, params: Any, era: str = "a", **columns: Any) -> dict[str, Any]:
    """The values of a row the API inserts (era ``era``): every NOT NULL column given."""
    import json

    now = int(time.time() * 1000)
    row: dict[str, Any] = {
        "job_id": job_id,
        "task_type": task_type,
        "params": params if isinstance(params, (str, bytes, int, type(None))) else json.dumps(params),
        "status": "queued",
        "progress": 0,
        "created_at": now,
        "retry_count": 0,
        "max_retries": 3,
    }
    if era in ("b", "c"):
        row["priority"] = 5
    if era == "c":
        row["updated_at"] = now
    row.update(columns)
    return row


def insert_sqlite(path: Path, row: dict[str, Any]) -> None:
    """INSERT ``row`` with the driver, raw values as given (bytes stay bytes)."""
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        insert_into(conn, row)
    finally:
        conn.close()


def insert_into(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    """INSERT ``row`` into ``jobs`` on the API's own open connection ``conn``."""
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", list(row.values()))
