"""The project's foundation: settings from the environment, the app, the quick start."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from kombu import Connection

from cl_tasks.settings import SettingsError, load
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.support import wait_until


def test_default_broker_is_sqlite_under_cl_server_dir(tmp_path: Path) -> None:
    settings = load({"CL_SERVER_DIR": str(tmp_path)})
    assert settings.broker_url == f"sqlite:///{tmp_path / 'media_store.db'}"
    assert settings.result_backend == "cl_tasks.results:ResultBackend"
    assert settings.sqlite_path == tmp_path / "media_store.db"


def test_database_url_moves_the_file_and_broker_url_overrides(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.db"
    settings = load({"CL_SERVER_DIR": str(tmp_path), "DATABASE_URL": f"sqlite:///{other}"})
    assert settings.broker_url == f"sqlite:///{other}"
    moved = load({"DATABASE_URL": f"sqlite:///{other}", "CELERY_BROKER_URL": "amqp://guest@localhost//"})
    assert moved.broker_url == "amqp://guest@localhost//"


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="LOG_LEVEL='LOUD'"):
        load({"LOG_LEVEL": "loud"})
    with pytest.raises(SettingsError, match="CELERY_BROKER_URL is required"):
        load({"DATABASE_URL": "postgresql://localhost/test"})
    with pytest.raises(SettingsError, match="DATABASE_URL="):
        load({"DATABASE_URL": "sqlite://relative-without-third-slash.db"})
    with pytest.raises(SettingsError, match="SQLITE_SYNCHRONOUS='OFF' must be one of NORMAL, FULL, EXTRA"):
        load({"SQLITE_SYNCHRONOUS": "off"})
    with pytest.raises(SettingsError, match="BROKER_VISIBILITY_TIMEOUT='soon'"):
        load({"BROKER_VISIBILITY_TIMEOUT": "soon"})
    assert load({"SQLITE_SYNCHRONOUS": "full"}).sqlite_synchronous == "FULL"


def test_sqlite_synchronous_reaches_the_jobs_table(tmp_path: Path) -> None:
    from cl_tasks.jobs import JobStore
    from tests.conftest import make_api_database

    make_api_database(tmp_path / "media_store.db")  # WAL, as the API service makes it
    store = JobStore(f"sqlite:///{tmp_path / 'media_store.db'}", synchronous="FULL")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with JobStore(f"sqlite:///{tmp_path / 'media_store.db'}").engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL, the default
    # A file in rollback-journal mode keeps FULL: NORMAL is safe only with WAL
    with JobStore(f"sqlite:///{tmp_path / 'journal.db'}").engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2


def test_relative_url_and_explicit_transport_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Connection("sqlite:///relative.db") as conn:
        conn.connect()
    assert (tmp_path / "relative.db").exists()
    with Connection(f"sqlite:///{tmp_path / 'explicit.db'}", transport="transports.sqlite:Transport") as conn:
        conn.SimpleQueue("q").put("hello")
        assert conn.SimpleQueue("q").get(timeout=2).payload == "hello"


def test_quick_start_worker_on_the_embedded_default(tmp_path: Path) -> None:
    # Given a fresh folder and no configuration at all
    env = subprocess_env()
    for name in ("CL_SERVER_DIR", "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    log = tmp_path / "worker.log"
    # When `cl-tasks worker` starts there
    worker = subprocess.Popen(
        [PYTHON, "-m", "cl_tasks.cli", "worker", "--worker-id", "quick", "-P", "solo", "--logfile", str(log)],
        cwd=tmp_path,
        env=env,
    )
    try:

        def ready() -> bool:
            assert worker.poll() is None, "the worker exited before it was ready"
            return "ready." in (log.read_text() if log.exists() else "")

        wait_until(ready, 60, "the worker's ready line")
        # Then it runs on ./data/media_store.db, owner-only, and answers celery inspect
        database = tmp_path / "data" / "media_store.db"
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
        assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
        ping = subprocess.run(
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "cl_tasks",
                "inspect",
                "ping",
                "-t",
                "3",
                "-d",
                f"quick@{socket.gethostname()}",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "pong" in ping.stdout, ping.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert os.path.exists(tmp_path / "data" / "media_store.db")
