"""The Celery app of cl_tasks (``celery -A cl_tasks``), configured from ``celeryconfig``.

When a worker starts (not at import, and not in clients), ``CL_SERVER_DIR`` is
created with owner-only rights if it is missing, and the SQLite database file
with mode 0600, so the embedded default works on a fresh machine. A client
(``.delay``, ``cl-tasks submit``) never creates them: on a missing folder the
broker names the path and the fix. A ``DATABASE_URL`` outside
``CL_SERVER_DIR`` is never created either.

The app is :class:`cl_tasks.messages.App` and its workers use
:class:`cl_tasks.messages.Consumer`: clients refuse to publish a serializer the
workers refuse (pickle) or oversized job params, and a worker refuses a
malformed message (dead letter) instead of stopping on it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

import transports  # noqa: F401 - registers the ``sqlite://`` broker alias
from cl_tasks import flower_support
from cl_tasks.messages import App

app = App("cl_tasks", events="cl_tasks.events:Events")
app.config_from_object("celeryconfig")
app.conf.task_routes = ("cl_tasks.tasks.route",)
app.conf.worker_consumer = "cl_tasks.messages:Consumer"
# Under `celery -A cl_tasks flower`, Flower is loaded before the app: teach it our broker.
flower_support.install()


@signals.celeryd_init.connect
def prepare_server_dir(**_: Any) -> None:
    """Create ``CL_SERVER_DIR`` (0700) and the SQLite database (0600) when a worker starts."""
    from cl_tasks.settings import current

    settings = current()
    settings.server_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = settings.sqlite_path
    if database is not None and database.parent.is_dir() and not database.exists():
        # Owner-only from the start, whichever of broker and result backend opens it first.
        os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
