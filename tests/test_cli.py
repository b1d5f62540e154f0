"""An operator's day: bad settings, Ctrl-C, pipes, terminals, silent surprises (issue 17, items 1, 4, 6).

Every command here is a real subprocess (``cl-tasks``, ``celery -A cl_tasks worker``)
or a real worker; the MQTT outage is a real Mosquitto that is not started yet.
"""

from __future__ import annotations

import logging
import os
import pty
import select
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cl_tasks.modules import read_module, uv_binary, venv_python
from cl_tasks.mqtt import Publisher
from cl_tasks.settings import SettingsError, load
from tests.mqtt_support import PrivateMosquitto
from tests.support import (
    PYTHON,
    TEST_MODULES,
    Database,
    StartWorker,
    Worker,
    compute_env,
    insert_job,
    job_row,
    run_celery,
    run_python,
    wait_for_job,
    wait_until,
)

COMMANDS = (
    ["jobs"],
    ["job", "some-id"],
    ["queues"],
    ["submit", "image_resize", "width=1"],
    ["worker"],
    ["cleanup-mqtt", "inference/workers/#"],
)


def cl_tasks(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(env, "-m", "cl_tasks.cli", *args)


def bad_settings(tmp_path: Path) -> dict[str, dict[str, str]]:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    return {
        "LOG_LEVEL": {"LOG_LEVEL": "verbose"},
        "MQTT_PORT": {"MQTT_PORT": "abc"},
        "WORKER_ID": {"WORKER_ID": "a/b"},
        "CL_SERVER_DIR": {"CL_SERVER_DIR": str(a_file)},
    }


def expected_line(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as raised:
        load(env)
    return f"cl-tasks: error: {raised.value}"


@pytest.mark.parametrize("variable", ["LOG_LEVEL", "MQTT_PORT", "WORKER_ID", "CL_SERVER_DIR"])
def test_a_bad_setting_is_one_line_and_exit_2_from_every_command(tmp_path: Path, variable: str) -> None:
    # Given one bad setting
    env = {**compute_env(tmp_path / "data"), **bad_settings(tmp_path)[variable]}
    line = expected_line(env)
    assert line.startswith(f"cl-tasks: error: {variable}=")
    # Then every cl-tasks command says it in that one line, exit code 2
    for command in COMMANDS:
        result = cl_tasks(env, *command)
        assert (result.returncode, result.stderr.strip(), result.stdout) == (2, line, ""), command
    # And celery -A cl_tasks worker (and a remote-control command) print the same line, no traceback
    for celery_command in (["worker", "-P", "solo"], ["inspect", "ping", "-t", "1"]):
        result = run_celery(env, *celery_command)
        assert (result.returncode, result.stderr.strip()) == (2, line), result.stdout
    if variable == "CL_SERVER_DIR":
        assert "is a file, not a folder" in line


def test_help_works_whatever_the_settings(tmp_path: Path) -> None:
    env = compute_env(tmp_path / "data", LOG_LEVEL="verbose", MQTT_PORT="abc")
    top = cl_tasks(env, "--help")
    assert top.returncode == 0 and top.stdout.startswith("usage: cl-tasks")
    for command in COMMANDS:
        result = cl_tasks(env, command[0], "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: cl-tasks {command[0]}")


def test_bare_command_prints_help_and_version_exists(tmp_path: Path) -> None:
    env = compute_env(tmp_path / "data")
    bare = cl_tasks(env)
    assert bare.returncode == 0 and bare.stdout.startswith("usage: cl-tasks")
    assert "submit" in bare.stdout and "worker" in bare.stdout
    version = cl_tasks(env, "--version")
    assert version.returncode == 0 and version.stdout.strip() == "cl-tasks, version 0.1.0"
    unknown = cl_tasks(env, "jobs", "--colour")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "cl-tasks: error: No such option '--colour' (see `cl-tasks jobs --help`)"


def test_ctrl_c_under_submit_wait_says_the_job_goes_on(jobs_env: dict[str, str], database: Database) -> None:
    # Given `submit --wait` following a job (no worker: it stays queued)
    follow = subprocess.Popen(
        [PYTHON, "-m", "cl_tasks.cli", "submit", "ledger_echo", "ledger_path=l.txt", "--wait"],
        env=jobs_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follow.stdout is not None
    submitted = follow.stdout.readline()
    job_id = submitted.split()[1]
    assert submitted.strip() == f"job {job_id} submitted (ledger_echo)"
    assert follow.stdout.readline().strip() == "progress 0%"  # it is following
    # When the operator presses Ctrl-C
    follow.send_signal(signal.SIGINT)
    try:
        _, err = follow.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        follow.kill()
        _, err = follow.communicate()
        raise AssertionError(f"submit --wait did not end on Ctrl-C; its stderr: {err}") from None
    # Then one line says the job goes on and how to follow it; no traceback
    assert follow.returncode == 130
    assert err.strip() == (
        f"cl-tasks: error: stopped following job {job_id}; the job goes on (Ctrl-C does not cancel it):"
        f" `cl-tasks job {job_id}` shows it, `cl-tasks jobs` lists them"
    )
    assert job_row(database, job_id)["status"] == "queued"


@pytest.mark.parametrize("command", [["jobs"], ["jobs", "--json"], ["job", "job-1"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(
    jobs_env: dict[str, str], database: Database, command: list[str]
) -> None:
    for n in range(30):
        insert_job(database, f"job-{n}", "image_resize", {"width": n})
    # Given a pipe whose reader has gone (`cl-tasks jobs | head -1` once head has its line)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [PYTHON, "-m", "cl_tasks.cli", *command],
            env=jobs_env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    # Then it ends at once, quietly (no BrokenPipeError)
    assert (result.returncode, result.stderr) == (1, "")


def read_terminal(command: list[str], env: dict[str, str], timeout: float = 120.0) -> tuple[int, str]:
    """Run ``command`` with a terminal as its stdout; its exit code and what it drew."""
    master, slave = pty.openpty()
    process = subprocess.Popen(command, env=env, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    drawn = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        assert ready, f"no output for {timeout}s; so far: {drawn!r}"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    return process.wait(timeout=30), drawn.decode(errors="replace")


def test_submit_wait_on_a_terminal_draws_a_bar_with_elapsed_time_and_time_left(
    jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1")
    command = [PYTHON, "-m", "cl_tasks.cli", "submit", "ledger_echo", "ledger_path=l.txt"]
    code, drawn = read_terminal([*command, "steps=4", "seconds=0.5", 'echo="hi"', "--wait"], jobs_env)
    assert code == 0, drawn
    assert "━" in drawn  # rich's bar
    assert "elapsed" in drawn and "left" in drawn and "100%" in drawn
    assert "0:00:0" in drawn  # the elapsed-time column
    assert '"echo": "hi"' in drawn
    assert "progress " not in drawn  # the plain lines are for pipes


def test_module_venvs_are_built_with_uv_even_off_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given no uv on PATH (a worker started as .venv/bin/cl-tasks, .venv/bin not on PATH)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    binary = uv_binary()
    assert binary is not None and Path(binary).is_file()
    # When a module's venv is built
    python = venv_python(tmp_path / "venvs", read_module(TEST_MODULES / "ledger_tools"))
    # Then uv built it (uv writes its version into pyvenv.cfg; venv + pip does not)
    config = (python.parent.parent / "pyvenv.cfg").read_text()
    assert "uv = " in config, config


def test_a_new_empty_database_is_said_loudly(tmp_path: Path) -> None:
    # Given a CL_SERVER_DIR that does not exist (mistyped)
    mistyped = tmp_path / "dta"
    env = compute_env(mistyped, BROADCAST_TYPE="noop")
    notice = f"new empty database {mistyped / 'media_store.db'}"
    # When a worker starts there
    banner = tmp_path / "banner.txt"
    worker = Worker(env, tmp_path / "worker.log", "-Q", "ledger_echo", "-P", "solo", output=banner)
    try:
        worker.wait_ready()
    finally:
        worker.stop()
    # Then the log says it in one WARNING line, and so does the start-up banner
    logged = [line for line in worker.text().splitlines() if notice in line]
    assert len(logged) == 1 and "WARNING" in logged[0] and "CL_SERVER_DIR" in logged[0], logged
    assert f".> WARNING: {notice}" in banner.read_text()
    # And a worker started on it again (now an existing database) says nothing of the kind
    again = Worker(env, tmp_path / "again.log", "-Q", "ledger_echo", "-P", "solo", output=banner)
    try:
        again.wait_ready()
    finally:
        again.stop()
    assert "new empty database" not in again.text() + banner.read_text()
    assert f".> jobs database: sqlite:///{mistyped / 'media_store.db'}" in banner.read_text()


def test_an_unreachable_mqtt_broker_is_logged_once_then_once_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cl_tasks.mqtt")
    broker = PrivateMosquitto(tmp_path)  # not started yet: nobody listens on its port
    settings = load({"MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(broker.port)}).mqtt
    publisher = Publisher(settings, role="test")
    try:
        wait_until(lambda: publisher.failed_attempts >= 2, 30, "two failed connection attempts")
        broker.start()
        wait_until(lambda: publisher.connected, 30, "connected once the broker answers")
    finally:
        publisher.close()
        broker.stop()
    said = [record for record in caplog.records if record.name == "cl_tasks.mqtt"]
    where = f"127.0.0.1:{broker.port}"
    unreachable = [r for r in said if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
    connected = [r for r in said if "connected to" in r.getMessage()]
    assert len(unreachable) == 1 and where in unreachable[0].getMessage(), [r.getMessage() for r in said]
    assert len(connected) == 1 and f"MQTT connected to {where} after " in connected[0].getMessage()


def test_a_bad_input_job_logs_one_line_and_a_retry_its_reason(
    jobs_env: dict[str, str], database: Database, start_worker: StartWorker
) -> None:
    worker = start_worker(jobs_env, "-Q", "ledger_echo,misbehave", "-c", "1")
    # Given a job with bad input (a path outside CL_SERVER_DIR) and one whose runner crashes once
    insert_job(database, "bad-input", "ledger_echo", {"ledger_path": "/etc/cl-tasks-ledger"})
    insert_job(database, "crashes", "misbehave", {"mode": "crash"}, max_retries=1)
    assert wait_for_job(database, "bad-input")["status"] == "error"
    assert wait_for_job(database, "crashes")["status"] == "error"
    worker.stop()
    log = worker.text()
    # Then the bad input is one line (expected user input), with no traceback anywhere
    said = ("received", "published")  # the intake's and Celery's lines of every job
    about_bad = [line for line in log.splitlines() if "bad-input" in line and not line.endswith(said)]
    assert len(about_bad) == 1 and "raised expected: JobError" in about_bad[0], about_bad
    assert "Traceback" not in log
    # And the retry says why
    retries = [line for line in log.splitlines() if "crashes" in line and "retry" in line.lower()]
    assert retries and all("exited with code 3" in line for line in retries), retries


def test_errors_of_the_database_are_one_line(tmp_path: Path) -> None:
    # Given a database file without the API's jobs table, and a PostgreSQL nobody listens on
    empty = tmp_path / "empty"
    empty.mkdir()
    sqlite3.connect(empty / "media_store.db").close()
    no_table = compute_env(empty)
    unreachable = {
        **compute_env(tmp_path / "data"),
        "DATABASE_URL": "postgresql://root@127.0.0.1:9/nothing",
        "CELERY_BROKER_URL": "redis://127.0.0.1:9/0",
    }
    # Then each command says what failed in one line, exit code 2
    for env, said in (
        (no_table, "cl-tasks: error: there is no jobs table in sqlite:///"),
        (unreachable, "cl-tasks: error: the jobs database (127.0.0.1:9/nothing) failed: "),
    ):
        for command in (["jobs"], ["job", "x"], ["queues"]):
            result = cl_tasks(env, *command)
            assert result.returncode == 2 and result.stderr.startswith(said), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
