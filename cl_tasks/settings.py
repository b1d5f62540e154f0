"""Environment variables -> one frozen :class:`Settings`, validated at start.

This is the only module that reads ``os.environ``; ``celeryconfig.py`` calls
:func:`load` once. A bad value raises :class:`SettingsError` naming the variable.

Defaults (decided here, documented in the README):

* ``CL_SERVER_DIR``: ``./data`` (created if missing); the folder of
  ``media_store.db`` and the root that relative job paths resolve against.
* ``DATABASE_URL``: ``sqlite:///$CL_SERVER_DIR/media_store.db`` (SQLAlchemy form).
* ``CELERY_BROKER_URL``: the SQLite transport on the ``DATABASE_URL`` file
  when that is SQLite; required otherwise.
* ``CELERY_RESULT_BACKEND``: Celery's SQLAlchemy backend on the same database.
* ``COMPUTE_MODULES_DIR``: the ``compute_modules`` folder of this repository.
* ``COMPUTE_VENV_DIR``: ``$CL_SERVER_DIR/venvs`` (one virtualenv per module).
* ``WORKER_SUPPORTED_TASKS``: empty = every discovered task type.
* ``WORKER_POLL_INTERVAL``: 5.0 s, the fallback intake poll (SQLite wakes on commits).
* ``JOB_LEASE_SECONDS``: 30.0 s; a job whose worker stopped renewing it this long is
  taken over by another worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Folder used when ``CL_SERVER_DIR`` is not set (relative to the working directory).
DEFAULT_SERVER_DIR = "data"
#: File name of the shared database inside ``CL_SERVER_DIR``.
DATABASE_FILE = "media_store.db"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Seconds between intake polls when no commit signal is available.
DEFAULT_POLL_INTERVAL = 5.0
#: Seconds a job's claim lasts without renewal (renewed every third of it).
DEFAULT_JOB_LEASE = 30.0
#: The compute modules shipped with this repository.
BUNDLED_MODULES_DIR = Path(__file__).resolve().parent.parent / "compute_modules"


class SettingsError(ValueError):
    """Raised when an environment variable has a value cl_tasks cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything cl_tasks takes from the environment."""

    server_dir: Path
    database_url: str
    broker_url: str
    result_backend: str
    log_level: str
    modules_dir: Path
    venv_dir: Path
    supported_tasks: frozenset[str]
    poll_interval: float
    job_lease: float

    @property
    def sqlite_path(self) -> Path | None:
        """The database file when ``database_url`` is SQLite, else None."""
        return sqlite_path(self.database_url)


def sqlite_path(url: str) -> Path | None:
    """``/abs/path.db`` of ``sqlite:////abs/path.db`` (SQLAlchemy form); None for other URLs."""
    for scheme in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(scheme):
            return Path(url[len(scheme) :].split("?", 1)[0]).absolute()
    return None


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings from ``environ`` (``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    server_dir = Path(env.get("CL_SERVER_DIR") or DEFAULT_SERVER_DIR).absolute()
    database_url = env.get("DATABASE_URL") or f"sqlite:///{server_dir / DATABASE_FILE}"
    database = sqlite_path(database_url)
    if database_url.startswith("sqlite") and database is None:
        raise SettingsError(
            f"DATABASE_URL={database_url!r} is not an SQLite URL cl_tasks understands;"
            " write sqlite:////absolute/path/media_store.db"
        )
    broker_url = env.get("CELERY_BROKER_URL") or (f"sqlite:///{database}" if database else "")
    if not broker_url:
        raise SettingsError(
            "CELERY_BROKER_URL is required when DATABASE_URL is not SQLite"
            " (for example amqp://guest:guest@127.0.0.1:5672//)"
        )
    result_backend = env.get("CELERY_RESULT_BACKEND") or f"db+{database_url}"
    log_level = (env.get("LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    supported = env.get("WORKER_SUPPORTED_TASKS") or ""
    return Settings(
        server_dir=server_dir,
        database_url=database_url,
        broker_url=broker_url,
        result_backend=result_backend,
        log_level=log_level,
        modules_dir=Path(env.get("COMPUTE_MODULES_DIR") or BUNDLED_MODULES_DIR).absolute(),
        venv_dir=Path(env.get("COMPUTE_VENV_DIR") or server_dir / "venvs").absolute(),
        supported_tasks=frozenset(name.strip() for name in supported.split(",") if name.strip()),
        poll_interval=_positive(env, "WORKER_POLL_INTERVAL", DEFAULT_POLL_INTERVAL),
        job_lease=_positive(env, "JOB_LEASE_SECONDS", DEFAULT_JOB_LEASE),
    )


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} must be a number of seconds") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be above 0")
    return value


_current: Settings | None = None


def current() -> Settings:
    """The settings of this process, loaded once from ``os.environ``."""
    global _current  # noqa: PLW0603 - one frozen object per process
    if _current is None:
        _current = load()
    return _current
