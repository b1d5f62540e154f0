"""Environment variables -> one frozen :class:`Settings`, validated at start.

This is the only module that reads ``os.environ``; ``celeryconfig.py`` calls
:func:`load` once. A bad value raises :class:`SettingsError` naming the variable
and what to set it to. :class:`SettingsError` is also a ``click.ClickException``
(click is Celery's own CLI library): under any click command, ``cl-tasks`` and
``celery -A cl_tasks …`` alike, it ends the command with that one line on stderr
(:data:`ERROR_PREFIX` + the message) and exit code 2, never a traceback, wherever
Celery first reads its configuration.

Defaults (decided here, documented in the README):

* ``CL_SERVER_DIR``: ``./data`` (created if missing); the folder of
  ``media_store.db`` and the root that relative job paths resolve against.
* ``DATABASE_URL``: ``sqlite:///$CL_SERVER_DIR/media_store.db`` (SQLAlchemy form).
* ``CELERY_BROKER_URL``: the SQLite transport on the ``DATABASE_URL`` file
  when that is SQLite; required otherwise.
* ``CELERY_RESULT_BACKEND``: ``cl_tasks.results:ResultBackend``, a key/value table
  beside ``jobs`` in ``DATABASE_URL``.
* ``COMPUTE_MODULES_DIR``: the ``compute_modules`` folder of this repository.
* ``COMPUTE_VENV_DIR``: ``$CL_SERVER_DIR/venvs`` (one virtualenv per module).
* ``WORKER_SUPPORTED_TASKS``: empty = every discovered task type.
* ``WORKER_POLL_INTERVAL``: 5.0 s, the fallback intake poll (SQLite wakes on commits).
* ``JOB_LEASE_SECONDS``: 30.0 s; a job whose worker stopped renewing it this long is
  taken over by another worker.
* ``JOB_PARAMS_MAX_BYTES``: 1 MiB (1,048,576); a job whose ``params`` JSON is larger
  ends ``error`` naming the limit (API rows), or is refused at submit (``.delay``,
  ``submit_job``). Params name files under ``CL_SERVER_DIR``; they are not a way to
  ship data, and every byte of them crosses the broker and the jobs table.
* ``JOB_TIME_LIMIT`` (1800 s), ``JOB_MAX_PAIRS`` (1000 paths per list parameter),
  ``JOB_MAX_OUTPUT_PIXELS`` (100,000,000): the limits of one job, decided in
  :mod:`cl_tasks.limits`; each refusal names its limit.
* ``BROKER_VISIBILITY_TIMEOUT``: 60.0 s; a broker message taken by a worker that
  died comes back after this long (SQLite and Redis brokers; RabbitMQ notices the
  closed connection at once). The SQLite transport extends it while the worker
  lives, so long jobs are safe; Redis does not, and a redelivered job still runs
  once because the job's lease in the jobs table is held by the first worker.
* ``SQLITE_SYNCHRONOUS``: ``NORMAL`` (or ``FULL``, ``EXTRA``), for the jobs table and
  the SQLite broker (whose URL's ``synchronous`` wins). ``NORMAL`` never corrupts the
  database; a power loss may lose the last commits. ``FULL`` keeps them, at about one
  fsync per commit.
* ``DB_WRITE_SHARE``: 1 (no limit); the most of wall time the job processes on one
  SQLite database may hold its write lock, so that the API service's inserts wait
  for it less often, at the cost of the rate of small jobs (:mod:`cl_tasks.writeshare`
  has the figures); a number above 0, at most 1.
* MQTT: ``BROADCAST_TYPE`` (``mqtt`` or ``noop``), ``MQTT_BROKER`` (``localhost``),
  ``MQTT_PORT`` (1883, or 8883 with TLS), ``MQTT_TOPIC`` (``inference/events``),
  ``CAPABILITY_TOPIC_PREFIX`` (``inference/workers``), ``MQTT_HEARTBEAT_INTERVAL``
  (30 s), ``MQTT_USERNAME``/``MQTT_PASSWORD``, ``MQTT_USE_TLS`` (false) with
  ``MQTT_CA_FILE`` (system CAs when unset), ``WORKER_ID`` (the Celery node name
  when unset; one MQTT topic level: no ``/``, ``+`` or ``#``).
* ``RUNNER_CONFINEMENT``: ``on`` (the strongest confinement the machine offers, see
  :mod:`cl_tasks.confinement`) or ``off`` (tests and diagnosis only; logged loudly).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from cl_tasks.limits import DEFAULT_MAX_OUTPUT_PIXELS, DEFAULT_MAX_PAIRS, DEFAULT_TIME_LIMIT, JobLimits
from cl_tasks.writeshare import DEFAULT_SHARE

#: Folder used when ``CL_SERVER_DIR`` is not set (relative to the working directory).
DEFAULT_SERVER_DIR = "data"
#: File name of the shared database inside ``CL_SERVER_DIR``.
DATABASE_FILE = "media_store.db"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: ``PRAGMA synchronous`` levels offered for SQLite (the first is the default).
SYNCHRONOUS_LEVELS = ("NORMAL", "FULL", "EXTRA")
#: Seconds between intake polls when no commit signal is available.
DEFAULT_POLL_INTERVAL = 5.0
#: Seconds a job's claim lasts without renewal (renewed every third of it).
DEFAULT_JOB_LEASE = 30.0
#: Seconds before a message of a dead consumer is delivered again (SQLite and Redis brokers).
DEFAULT_VISIBILITY_TIMEOUT = 60.0
#: Seconds between capability announcements of an unchanged worker.
DEFAULT_HEARTBEAT = 30.0
#: Largest ``params`` JSON of a job, in bytes (UTF-8).
DEFAULT_JOB_PARAMS_MAX_BYTES = 1024 * 1024
#: The compute modules shipped with this repository.
BUNDLED_MODULES_DIR = Path(__file__).resolve().parent.parent / "compute_modules"


_N = TypeVar("_N", int, float)


#: What every one-line error of cl_tasks starts with, from ``cl-tasks`` and ``celery -A cl_tasks``.
ERROR_PREFIX = "cl-tasks: error: "


class SettingsError(ValueError, click.ClickException):
    """Raised when an environment variable has a value cl_tasks cannot use (exit code 2 in a CLI)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        click.ClickException.__init__(self, message)

    def show(self, file: IO[Any] | None = None) -> None:
        """One line on stderr (or ``file``): :data:`ERROR_PREFIX` and the message."""
        click.echo(f"{ERROR_PREFIX}{self.message}", file=file, err=file is None)


@dataclass(frozen=True)
class MqttSettings:
    """Where and how job events and worker capabilities are published."""

    enabled: bool
    host: str
    port: int
    events_topic: str
    capability_prefix: str
    heartbeat_interval: float
    username: str | None
    password: str | None = field(repr=False)
    use_tls: bool
    ca_file: str | None


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
    visibility_timeout: float
    sqlite_synchronous: str
    mqtt: MqttSettings
    worker_id: str | None
    job_params_max_bytes: int = DEFAULT_JOB_PARAMS_MAX_BYTES
    runner_confinement: str = "on"
    limits: JobLimits = field(default_factory=JobLimits)
    db_write_share: float = DEFAULT_SHARE

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
    if server_dir.is_file():
        raise SettingsError(
            f"CL_SERVER_DIR={str(server_dir)!r} is a file, not a folder;"
            " set CL_SERVER_DIR to the folder that holds media_store.db"
        )
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
    result_backend = env.get("CELERY_RESULT_BACKEND") or "cl_tasks.results:ResultBackend"
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
        visibility_timeout=_positive(env, "BROKER_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT),
        sqlite_synchronous=_choice(env, "SQLITE_SYNCHRONOUS", SYNCHRONOUS_LEVELS),
        mqtt=_mqtt(env),
        worker_id=_worker_id(env.get("WORKER_ID") or None),
        job_params_max_bytes=_positive_int(env, "JOB_PARAMS_MAX_BYTES", DEFAULT_JOB_PARAMS_MAX_BYTES),
        runner_confinement=_confinement(env),
        limits=JobLimits(
            time_limit=_positive(env, "JOB_TIME_LIMIT", DEFAULT_TIME_LIMIT),
            max_pairs=_positive_int(env, "JOB_MAX_PAIRS", DEFAULT_MAX_PAIRS),
            max_output_pixels=_positive_int(env, "JOB_MAX_OUTPUT_PIXELS", DEFAULT_MAX_OUTPUT_PIXELS),
        ),
        db_write_share=_share(env, "DB_WRITE_SHARE", DEFAULT_SHARE),
    )


def _confinement(env: Mapping[str, str]) -> str:
    value = (env.get("RUNNER_CONFINEMENT") or "on").lower()
    if value not in ("on", "off"):
        raise SettingsError(f"RUNNER_CONFINEMENT={value!r} must be on or off")
    return value


def check_topic_level(value: str, variable: str) -> str:
    """``value`` if it can be one MQTT topic level, else :class:`SettingsError` naming ``variable``."""
    if not value or any(char in value for char in "/+#\x00"):
        raise SettingsError(
            f"{variable}={value!r} must be one MQTT topic level: not empty, without '/', '+' or '#'"
        )
    return value


def _worker_id(value: str | None) -> str | None:
    return None if value is None else check_topic_level(value, "WORKER_ID")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "false").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={raw!r} must be true or false")


def _mqtt(env: Mapping[str, str]) -> MqttSettings:
    kind = (env.get("BROADCAST_TYPE") or "mqtt").strip().lower()
    if kind not in ("mqtt", "noop"):
        raise SettingsError(f"BROADCAST_TYPE={kind!r} must be mqtt or noop")
    use_tls = _flag(env, "MQTT_USE_TLS")
    raw_port = env.get("MQTT_PORT") or ("8883" if use_tls else "1883")
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise SettingsError(f"MQTT_PORT={raw_port!r} must be a port number (1-65535)")
    ca_file = env.get("MQTT_CA_FILE") or None
    if ca_file is not None and not Path(ca_file).is_file():
        raise SettingsError(
            f"MQTT_CA_FILE={ca_file!r} is not a readable file; set it to the broker's CA file (PEM),"
            " or unset it to use the system CAs"
        )
    events_topic = env.get("MQTT_TOPIC") or "inference/events"
    prefix = (env.get("CAPABILITY_TOPIC_PREFIX") or "inference/workers").rstrip("/")
    for name, topic in (("MQTT_TOPIC", events_topic), ("CAPABILITY_TOPIC_PREFIX", prefix)):
        if any(char in topic for char in "+#"):
            raise SettingsError(f"{name}={topic!r} must not contain the wildcards '+' or '#'")
    return MqttSettings(
        enabled=kind == "mqtt",
        host=env.get("MQTT_BROKER") or "localhost",
        port=int(raw_port),
        events_topic=events_topic,
        capability_prefix=prefix,
        heartbeat_interval=_positive(env, "MQTT_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT),
        username=env.get("MQTT_USERNAME") or None,
        password=env.get("MQTT_PASSWORD") or None,
        use_tls=use_tls,
        ca_file=ca_file,
    )


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or choices[0]).upper()
    if value not in choices:
        raise SettingsError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, float, "a number of seconds")


def _share(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, _finite, "a number")
    if value > 1:
        raise SettingsError(f"{name}={env[name]!r} must be at most 1 (1: no limit)")
    return value


def _finite(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    return _number(env, name, default, int, "a whole number")


def _number(env: Mapping[str, str], name: str, default: _N, parse: Callable[[str], _N], kind: str) -> _N:
    """``name`` as a number above 0 (``default`` when unset), or :class:`SettingsError` naming it."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} must be {kind} above 0") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be above 0")
    return value


@cache
def current() -> Settings:
    """The settings of this process, loaded once from ``os.environ``."""
    return load()
