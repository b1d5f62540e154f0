"""Security: only JSON crosses the broker, jobs stay inside CL_SERVER_DIR, runners are
confined and see no credentials, files are owner-only, and MQTT credentials never show.

Two workers serve this module:

* ``guarded``: the default layout (venvs under ``CL_SERVER_DIR``, which the worker
  creates itself) with MQTT username and password against a private Mosquitto, and
  ``DATABASE_URL`` / ``CELERY_BROKER_URL`` set; it runs the ledger_tools module.
* ``imaging``: venvs outside ``CL_SERVER_DIR`` (the shared test venvs, with Pillow),
  for jobs that read and write images through hostile paths.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cl_tasks.confinement import LAUNCHER
from tests import support
from tests.mqtt_support import PrivateMosquitto, Subscriber, make_password_file
from tests.support import PYTHON, TEST_MODULES, TEST_VENVS, Worker, count, run_client, wait_dead_letter

MQTT_USER = "cl-security"
#: Unique per run, so finding it anywhere means it leaked from this run.
MQTT_PASSWORD = f"Pw-{secrets.token_hex(8)}"
#: The variables a runner may see (tests/test_jobs_bad_input.py checks the same set).
RUNNER_ENV = {"PATH", "HOME", "PYTHONUNBUFFERED", "CL_SERVER_DIR", "LANG", "LC_ALL", "TZ", "TMPDIR"}


# -- workers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("security")
    (folder / "outside").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "outside" / "secret.png")
    return folder


@pytest.fixture(scope="module")
def mosquitto(base: Path) -> Iterator[PrivateMosquitto]:
    folder = base / "mosquitto"
    folder.mkdir()
    broker = PrivateMosquitto(folder, password_file=make_password_file(folder, MQTT_USER, MQTT_PASSWORD))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def guarded_env(base: Path, mosquitto: PrivateMosquitto) -> dict[str, str]:
    data = base / "guarded"
    database = data / "media_store.db"
    return support.subprocess_env(
        CL_SERVER_DIR=str(data),
        DATABASE_URL=f"sqlite:///{database}",
        CELERY_BROKER_URL=f"sqlite:///{database}?polling_interval=0.5",
        COMPUTE_MODULES_DIR=str(TEST_MODULES),
        WORKER_POLL_INTERVAL="1",
        BROADCAST_TYPE="mqtt",
        MQTT_BROKER="127.0.0.1",
        MQTT_PORT=str(mosquitto.port),
        MQTT_USERNAME=MQTT_USER,
        MQTT_PASSWORD=MQTT_PASSWORD,
        CAPABILITY_TOPIC_PREFIX="security/workers",
        MQTT_TOPIC="security/events",
    )


@pytest.fixture(scope="module")
def guarded(base: Path, guarded_env: dict[str, str]) -> Iterator[Worker]:
    # Given no CL_SERVER_DIR yet: the worker creates it, the database and the venvs
    assert not (base / "guarded").exists()
    worker = Worker(
        guarded_env, base / "guarded.log", "-n", "guarded@%h", "-c", "2", "-Q", "ledger_echo,misbehave"
    )
    worker.wait_ready()
    wait_for_jobs_table(base / "guarded")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def imaging(base: Path) -> Iterator[Worker]:
    data = base / "imaging"
    data.mkdir()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(
        data / "good.png"
    )  # no jobs table yet: the API's comes after the worker
    env = support.compute_env(data, BROADCAST_TYPE="noop")
    worker = Worker(env, base / "imaging.log", "-n", "imaging@%h", "-c", "1", "-Q", "image_resize,misbehave")
    worker.wait_ready()
    wait_for_jobs_table(data)
    yield worker
    worker.stop()


def wait_for_jobs_table(data: Path) -> None:
    """The API's migration runs after the worker started (the worker never makes ``jobs``)."""
    support.wait_until((data / "media_store.db").exists, 60, f"the database in {data}")
    support.make_api_database(data / "media_store.db")


def run_row(data: Path, task_type: str, params: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """INSERT a queued row as the API service does; wait until it ends; return it."""
    return support.run_job(
        data / "media_store.db", f"sec-{uuid.uuid4().hex[:10]}", task_type, params, timeout
    )


def error_of(data: Path, task_type: str, params: dict[str, Any]) -> str:
    row = run_row(data, task_type, params)
    assert row["status"] == "error", row
    return str(row["error_message"])


# -- B1. only JSON crosses the broker ------------------------------------------------


class CreatesFile:
    """Unpickling this creates a file: what an attacker's pickle would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_pickled_task_message_is_dead_lettered_not_run(base: Path, guarded: Worker) -> None:
    data = base / "guarded"
    marker = base / "pickle-was-unpickled"
    job_id = f"pickled-{uuid.uuid4().hex}"
    # Given a protocol-2 Celery task message whose body is a pickle with a payload
    body = pickle.dumps(((CreatesFile(marker),), {"ledger_path": "pickle.txt"}, {}))
    headers = {"lang": "py", "task": "ledger_echo", "id": job_id, "argsrepr": "()", "kwargsrepr": "{}"}
    # When it is published into the worker's queue
    support.publish_raw(data / "media_store.db", body, headers, "application/x-python-serialize", "binary")
    # Then it is dead-lettered with the reason, and never unpickled nor run
    reason = wait_dead_letter(data / "media_store.db", job_id)
    assert "ContentDisallowed" in reason and "pickle" in reason, reason
    assert not marker.exists()
    assert (
        count(data / "media_store.db", "SELECT count(*) FROM jobs WHERE job_id = :job", {"job": job_id}) == 0
    )
    assert not (data / "pickle.txt").exists()
    # And the worker still serves
    assert run_row(data, "ledger_echo", {"ledger_path": "after-pickle.txt"})["status"] == "completed"


def test_the_client_refuses_to_send_pickle(base: Path, guarded: Worker, guarded_env: dict[str, str]) -> None:
    script = """
from kombu.exceptions import ContentDisallowed
from cl_tasks import app, image_resize
params = {"ledger_path": "client-pickle.txt"}
for send in (lambda: app.send_task("ledger_echo", kwargs=params, serializer="pickle"),
             lambda: image_resize.apply_async(kwargs=params, serializer="pickle")):
    try:
        print("sent", send().id)
    except ContentDisallowed as exc:
        print("refused", exc)
"""
    lines = run_client(guarded_env, script).splitlines()
    assert len(lines) == 2 and all(line.startswith("refused") for line in lines), lines
    assert "serializer 'pickle' is refused; only ['application/json'] crosses the broker" in lines[0]
    database = base / "guarded" / "media_store.db"
    assert count(database, "SELECT count(*) FROM jobs WHERE params LIKE '%client-pickle%'") == 0
    assert count(database, "SELECT count(*) FROM kombu_message WHERE payload LIKE '%python-serialize%'") == 0


# -- B2. jobs stay inside CL_SERVER_DIR -------------------------------------------


def resize(**paths: list[str]) -> dict[str, Any]:
    return {"input_paths": ["good.png"], "output_paths": ["out/ok.png"], "width": 4, "height": 4, **paths}


def test_dot_dot_traversal_is_refused(base: Path, imaging: Worker) -> None:
    data = base / "imaging"
    message = error_of(data, "image_resize", resize(input_paths=["out/../../outside/secret.png"]))
    assert "resolves to" in message and f"outside CL_SERVER_DIR {data}" in message, message
    message = error_of(data, "image_resize", resize(output_paths=["../outside/written.png"]))
    assert f"resolves to {base / 'outside' / 'written.png'}, outside CL_SERVER_DIR" in message, message
    assert not (base / "outside" / "written.png").exists()


def refused_read_error(data: Path, input_path: str, output_path: str, created: Path) -> str:
    """The error of a job reading ``input_path``, once one writing ``output_path`` was refused
    (naming CL_SERVER_DIR) without creating ``created``."""
    message = error_of(data, "image_resize", resize(output_paths=[output_path]))
    assert "outside CL_SERVER_DIR" in message
    assert not created.exists()
    return error_of(data, "image_resize", resize(input_paths=[input_path]))


def test_absolute_paths_outside_are_refused(base: Path, imaging: Worker) -> None:
    secret = base / "outside" / "secret.png"
    written = base / "outside" / "abs.png"
    message = refused_read_error(base / "imaging", str(secret), str(written), written)
    assert message.startswith(f"parameter input_paths[0] '{secret}' resolves to {secret}, outside"), message


def test_a_symlinked_folder_in_the_middle_of_a_path_is_followed_and_refused(
    base: Path, imaging: Worker
) -> None:
    data = base / "imaging"
    (data / "albums").mkdir(exist_ok=True)
    (data / "albums" / "shared").symlink_to(base / "outside")
    created = base / "outside" / "deep"
    message = refused_read_error(data, "albums/shared/secret.png", "albums/shared/deep/new.png", created)
    assert f"resolves to {base / 'outside' / 'secret.png'}, outside CL_SERVER_DIR" in message, message


def test_an_output_path_through_a_symlink_pointing_outside_creates_nothing(
    base: Path, imaging: Worker
) -> None:
    data = base / "imaging"
    target = base / "outside" / "through-link.png"
    (data / "result.png").symlink_to(target)  # dangling: the file does not exist yet
    message = error_of(data, "image_resize", resize(output_paths=["result.png"]))
    assert f"resolves to {target}, outside CL_SERVER_DIR" in message, message
    assert not target.exists()


def test_a_symlink_that_stays_inside_is_allowed(base: Path, imaging: Worker) -> None:
    data = base / "imaging"
    (data / "originals").mkdir(exist_ok=True)
    (data / "originals" / "good.png").write_bytes((data / "good.png").read_bytes())
    (data / "latest").symlink_to(data / "originals")
    row = run_row(
        data, "image_resize", resize(input_paths=["latest/good.png"], output_paths=["latest/small.png"])
    )
    assert row["status"] == "completed", row
    assert (data / "originals" / "small.png").exists()


# -- B3. runners: no credentials, no shell, no writes outside -----------------------


def test_runners_get_no_credentials(base: Path, guarded: Worker, guarded_env: dict[str, str]) -> None:
    row = run_row(base / "guarded", "misbehave", {"mode": "env"})
    env = json.loads(row["task_output"])["env"]
    assert set(env) <= RUNNER_ENV, set(env) - RUNNER_ENV
    secrets_ = [
        guarded_env[name] for name in ("MQTT_PASSWORD", "MQTT_USERNAME", "DATABASE_URL", "CELERY_BROKER_URL")
    ]
    leaked = [value for value in env.values() for secret in secrets_ if secret in value]
    assert not leaked, leaked


@pytest.mark.parametrize(
    "hostile",
    ["; touch shell-1", "$(touch shell-2)", "`touch shell-3`", "| touch shell-4", "&& touch shell-5 #"],
)
def test_params_are_never_parsed_by_a_shell(base: Path, guarded: Worker, hostile: str) -> None:
    data = base / "guarded"
    marker = hostile.split("touch ")[1].split(maxsplit=1)[0].rstrip(")`")
    row = run_row(data, "ledger_echo", {"ledger_path": hostile, "echo": hostile})
    # The whole string is one file name inside CL_SERVER_DIR; nothing ran the command
    assert row["status"] == "completed", row
    assert (data / hostile).is_file()
    for folder in (data, TEST_MODULES / "ledger_tools", Path.cwd(), base):
        assert not (folder / marker).exists(), folder / marker


def planted_files(outcome: dict[str, str]) -> list[Path]:
    return [Path(path) for path, result in outcome.items() if result == "written"]


def test_a_module_cannot_write_into_any_venv_under_cl_server_dir(base: Path, guarded: Worker) -> None:
    data = base / "guarded"
    # Given the default layout: every venv lives under CL_SERVER_DIR
    venvs = data / "venvs"
    (venvs / "image_tools").mkdir(exist_ok=True)  # another module's venv folder
    inside, outside = data / "allowed.txt", Path("/var/tmp") / f"cl-tasks-planted-{uuid.uuid4().hex}"
    # When a module tries to write into its own venv, beside it, into CL_SERVER_DIR and outside
    row = run_row(data, "misbehave", {"mode": "write_other_venv", "targets": [str(inside), str(outside)]})
    outcome = json.loads(row["task_output"])["writes"]
    try:
        # Then its own venv is read-only, and nothing else of the machine is even there
        # (changed with cl_tasks.confinement: a runner writes only its job's outputs)
        assert outcome[str(venvs / "ledger_tools" / "planted-by-misbehave")] == "refused: EROFS", outcome
        assert str(venvs / "image_tools" / "planted-by-misbehave") not in outcome  # out of its sight
        # (a write under /tmp lands in the runner's private /tmp, never on the host)
        assert outcome[str(outside)] == "refused: ENOENT", outcome
        assert not inside.exists() and not outside.exists()
    finally:
        for path in planted_files(outcome):
            path.unlink(missing_ok=True)
    assert "runner confinement: bubblewrap" in guarded.text()


def test_a_module_cannot_write_into_venvs_outside_cl_server_dir(base: Path, imaging: Worker) -> None:
    # Given venvs outside CL_SERVER_DIR (the shared test venvs, one with Pillow)
    targets = [str(TEST_MODULES / "ledger_tools" / "planted.txt"), "/usr/local/planted.txt"]
    row = run_row(base / "imaging", "misbehave", {"mode": "write_other_venv", "targets": targets})
    outcome = json.loads(row["task_output"])["writes"]
    try:
        # Then every write into its venv, its module folder and the system is refused:
        # they are read-only binds in the runner's mount namespace
        assert str(TEST_VENVS / "ledger_tools" / "planted-by-misbehave") in outcome
        assert outcome and set(outcome.values()) == {"refused: EROFS"}, outcome
    finally:
        for path in planted_files(outcome):
            path.unlink()


PROBE = """
import sys
for path in sys.argv[1:]:
    try:
        with open(path, "a") as planted:
            planted.write("x")
        print(path, "written")
    except OSError as exc:
        print(path, "refused", exc.errno)
"""


def test_without_bubblewrap_the_launcher_still_confines_reads_and_writes(tmp_path: Path) -> None:
    # Given the launcher alone (the "landlock" mode: no bwrap, or no user namespaces), not root
    scratch, data, probe = tmp_path / "scratch", tmp_path / "data", tmp_path / "probe.py"
    scratch.mkdir()
    data.mkdir()
    (data / "media_store.db").write_text("the database")
    probe.write_text(PROBE)
    outside = Path("/var/tmp") / f"cl-tasks-probe-{uuid.uuid4().hex}"
    readable = [sys.prefix, sys.base_prefix, "/usr", "/lib", "/lib64", "/etc/ld.so.cache", str(probe)]
    command = [PYTHON, "-I", str(LAUNCHER), "--write", str(scratch)]
    command += [arg for path in readable for arg in ("--read", path)]
    inside = scratch / "inside.txt"
    targets = [str(inside), str(outside), str(data / "media_store.db")]
    result = subprocess.run(
        ["unshare", "--user", "--map-user=65534", *command, "--", PYTHON, str(probe), *targets],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it says what it limits, and the runner writes only its scratch folder, reads no database
    assert "no TCP" in result.stderr and "reads only of" in result.stderr, result.stderr
    assert result.stdout.splitlines() == [
        f"{inside} written",
        f"{outside} refused 13",
        f"{data / 'media_store.db'} refused 13",
    ], result.stdout + result.stderr
    assert not outside.exists() and (data / "media_store.db").read_text() == "the database"


# -- B4. owner-only files; MQTT credentials never show --------------------------------


def test_the_worker_creates_owner_only_folders_and_files(base: Path, guarded: Worker) -> None:
    data = base / "guarded"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("media_store.db", "media_store.db-wal", "media_store.db-shm"):
        if (data / name).exists() or name == "media_store.db":
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((data / "venvs").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "venvs" / "ledger_tools").stat().st_mode) == 0o700


def test_mqtt_credentials_never_show(
    base: Path, guarded: Worker, guarded_env: dict[str, str], mosquitto: PrivateMosquitto
) -> None:
    # Given the worker is logged in to the broker with the password (it published its capabilities)
    subscriber = Subscriber("security/workers/#", mosquitto.port, username=MQTT_USER, password=MQTT_PASSWORD)
    try:
        subscriber.wait_for(lambda messages: any(message.payload for message in messages))
    finally:
        subscriber.close()
    run_row(base / "guarded", "misbehave", {"mode": "env"})  # a warm runner to look at
    # When an operator dumps the worker's configuration
    node = f"guarded@{socket.gethostname()}"
    conf = support.run_celery(guarded_env, "inspect", "conf", "-t", "10", "-d", node)
    # Then the configuration is there, without the password
    assert "accept_content" in conf.stdout, conf.stdout + conf.stderr
    assert MQTT_PASSWORD not in conf.stdout + conf.stderr
    # And neither the log nor any process's argv or any runner's environment has it
    assert MQTT_PASSWORD not in guarded.text()
    runners = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        assert MQTT_PASSWORD not in argv, argv
        # (confined runners are not told CL_SERVER_DIR: found by their argv)
        if str(TEST_MODULES / "ledger_tools" / "runner.py") in argv:
            runners += 1
            assert MQTT_PASSWORD not in environ and "MQTT_" not in environ
    assert runners >= 1, "no runner of the guarded worker found to check"
    assert os.environ.get("MQTT_PASSWORD") != MQTT_PASSWORD
