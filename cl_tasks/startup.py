"""What a worker prepares and says as it starts: ``CL_SERVER_DIR``, its database, the banner.

When a worker starts (not at import, and not in clients), ``CL_SERVER_DIR`` is
created with owner-only rights if it is missing, and the SQLite database file
with mode 0600, so the embedded default works on a fresh machine. A client
(``.delay``, ``cl-tasks submit``) never creates them: on a missing folder the
broker names the path and the fix. A ``DATABASE_URL`` outside
``CL_SERVER_DIR`` is never created either.

A new database is never made silently: a mistyped ``CL_SERVER_DIR`` would
otherwise start a worker that waits on an empty table for ever, while the API
service writes its jobs elsewhere (and builds the module venvs anew). The worker
logs one WARNING naming the path and saying "new empty database", and its
start-up banner (:class:`Worker`, Celery's worker program) says it under
``[cl_tasks]``, beside the jobs database it works on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import signals
from celery.apps.worker import Worker as CeleryWorker
from sqlalchemy.engine import make_url

from cl_tasks.settings import current

logger = logging.getLogger(__name__)


class _Created:
    """The database file this worker process created at start, if any (one owner: this module)."""

    database: Path | None = None


def new_database_notice(database: Path) -> str:
    """The one line that says ``database`` was just created, empty."""
    return (
        f"new empty database {database}: nothing was there, so this worker starts on an empty"
        f" jobs table; if CL_SERVER_DIR={str(database.parent)!r} is mistyped, stop the worker and set"
        " CL_SERVER_DIR to the folder of the API's media_store.db"
    )


@signals.celeryd_init.connect
def prepare_server_dir(**_: Any) -> None:
    """Create ``CL_SERVER_DIR`` (0700) and the SQLite database (0600) when a worker starts."""
    settings = current()
    settings.server_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = settings.sqlite_path
    if database is not None and database.parent.is_dir() and not database.exists():
        # Owner-only from the start, whichever of broker and result backend opens it first.
        os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
        _Created.database = database


@signals.celeryd_after_setup.connect
def warn_new_database(**_: Any) -> None:
    """Logging is set up now: say loudly that the database is new (see the module docstring)."""
    if _Created.database is not None:
        logger.warning("%s", new_database_notice(_Created.database))


class Worker(CeleryWorker):
    """Celery's worker program; its banner also says where the jobs are (and if they are new)."""

    def startup_info(self, artlines: bool = True) -> str:
        url = make_url(current().database_url).render_as_string(hide_password=True)
        lines = ["", "[cl_tasks]", f".> jobs database: {url}"]
        if _Created.database is not None:
            lines.append(f".> WARNING: {new_database_notice(_Created.database)}")
        return str(super().startup_info(artlines)) + "\n".join(lines) + "\n"
