"""The Celery app of cl_tasks (``celery -A cl_tasks``), configured from ``celeryconfig``.

When the configuration is first read (not at import), ``CL_SERVER_DIR`` is
created with owner-only rights if it is missing (and the database file, 0600), so the embedded default works
on a fresh machine. A ``DATABASE_URL`` elsewhere is not created: a missing
folder there is reported by the broker with the path and the fix.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import transports  # noqa: F401 - registers the ``sqlite://`` broker alias

app = Celery("cl_tasks")
app.config_from_object("celeryconfig")
app.conf.task_routes = ("cl_tasks.tasks.route",)


@app.on_after_configure.connect  # type: ignore[untyped-decorator]
def _make_server_dir(sender: Celery, **_: Any) -> None:
    from cl_tasks.settings import load

    settings = load()
    settings.server_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = settings.sqlite_path
    if database is not None and database.parent.is_dir() and not database.exists():
        # Owner-only from the start, whichever of broker and result backend opens it first.
        os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
