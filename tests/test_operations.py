"""Operating cl_tasks: Flower (API and a real browser), celery inspect/control, cl-tasks, start_worker.sh."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.chromium import Chromium
from tests.conftest import (
    PYTHON,
    ROOT,
    TRANSPORT_NAME,
    Database,
    Worker,
    insert_job,
    run_client,
    wait_for_job,
)
from tests.mqtt_support import Subscriber, free_port, wait_port
from tests.support import wait_until as support_wait_until

StartWorker = Callable[..., Worker]
ARTIFACTS = ROOT / "test-artifacts"
NODE = f"w1@{socket.gethostname()}"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def flower(jobs_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Flower on a free port (API without auth); yields its base URL."""
    port = free_port()
    log = (tmp_path / "flower.log").open("w")
    process = subprocess.Popen(
        [PYTHON, "-m", "celery", "-A", "cl_tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**jobs_env, "FLOWER_UNAUTHENTICATED_API": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(port, timeout=60)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)
    log.close()


#: Flower's API refuses connections while it starts: such a look counts as "not yet".
wait_until = partial(support_wait_until, ignore=(OSError,), every=0.3)


def submit(env: dict[str, str], task: str, params: dict[str, Any]) -> str:
    script = f"import cl_tasks; print(cl_tasks.submit_job({task!r}, {params!r}).id)"
    return run_client(env, script).strip()


def test_flower_shows_workers_tasks_progress_and_queue_depth(
    jobs_env: dict[str, str], flower: str, start_worker: StartWorker, database: Database, tmp_path: Path
) -> None:
    worker = start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1")
    # /api/workers lists our worker with its queue
    workers = wait_until(lambda: get_json(f"{flower}/api/workers?refresh=1").get(NODE), what="worker listed")
    assert [queue["name"] for queue in workers["active_queues"]] == ["ledger_echo"]
    # A finished job shows as SUCCESS with progress 100 (not the last progress it reported)
    done = submit(jobs_env, "ledger_echo", {"ledger_path": "l.txt", "steps": 3, "seconds": 0.6})
    finished = wait_until(
        lambda: (t := get_json(f"{flower}/api/tasks").get(done, {})).get("state") == "SUCCESS" and t,
        what="SUCCESS",
    )
    assert finished["progress"] == 100
    # A running job shows STARTED with its progress beside it; the others wait in the queue
    running = submit(jobs_env, "ledger_echo", {"ledger_path": "l.txt", "steps": 40, "seconds": 0.5})
    for _ in range(4):
        submit(jobs_env, "ledger_echo", {"ledger_path": "l.txt", "steps": 40, "seconds": 0.5})
    task = wait_until(
        lambda: (
            (t := get_json(f"{flower}/api/tasks").get(running, {})).get("state") == "STARTED"
            and 0 < (t.get("progress") or 0) < 100
            and t
        ),
        what="STARTED with progress",
    )
    assert task["name"] == "ledger_echo" and task["worker"] == NODE
    assert str(task["result"]).startswith("progress ") and str(task["result"]).endswith("%")
    info = get_json(f"{flower}/api/task/info/{running}")
    assert info["uuid"] == running and "ledger_path" in info["kwargs"]
    # /api/queues/length shows the depth of the queue the test filled
    queues = get_json(f"{flower}/api/queues/length")["active_queues"]
    depth = {queue["name"]: queue["messages"] for queue in queues}
    assert depth["ledger_echo"] >= 2, queues
    # In headless Chromium: the dashboard, the Started filter, the task page's Terminate button
    terminate_in_the_browser(flower, database, running, tmp_path)
    # Then Flower shows it REVOKED, without the progress it had
    revoked = wait_until(
        lambda: (t := get_json(f"{flower}/api/tasks").get(running, {})).get("state") == "REVOKED" and t,
        what="REVOKED in Flower",
    )
    assert revoked["progress"] is None
    worker.kill()


def terminate_in_the_browser(flower: str, database: Database, running: str, tmp_path: Path) -> None:
    """Dashboard; Started filter -> the running job; its page -> Terminate; the row ends error "revoked"."""
    browser = Chromium(tmp_path)
    try:
        browser.open(f"{flower}/")
        browser.wait_for(
            f"document.body.innerText.includes({json.dumps(NODE)})", "the worker on the dashboard"
        )
        browser.screenshot(ARTIFACTS / "flower-dashboard.png")
        # The tasks page's Started filter lists the running job, and only started ones
        browser.open(f"{flower}/tasks")
        browser.click("button.task-state-filter[data-task-state='STARTED']")
        rows = "Array.from(document.querySelectorAll('#tasks-table tbody tr'), row => row.textContent)"
        shown = browser.wait_for(
            f"(rows => rows.some(row => row.includes({json.dumps(running)}))"
            f" && rows.every(row => row.includes('STARTED')) && rows)({rows})",
            "the running job, and only started ones, under the Started filter",
        )
        assert len(shown) == 1, shown
        assert re.search(r"STARTEDprogress [0-9.]+%", shown[0]), shown  # its progress beside its state
        browser.screenshot(ARTIFACTS / "flower-tasks-started.png")
        # Its page says STARTED, shows the progress and has a Terminate button; pressing it stops the job
        browser.open(f"{flower}/task/{running}")
        page = browser.evaluate("document.body.innerText")
        assert "STARTED" in page and "Progress" in page, page
        browser.screenshot(ARTIFACTS / "flower-task-started.png")
        browser.click("#task-terminate")
        browser.wait_for("document.getElementById('task-terminate').disabled", "Flower took the revoke")
    finally:
        browser.close()
    row = wait_for_job(database, running, timeout=60)
    assert row["status"] == "error"
    assert row["error_message"] == "revoked: terminated with SIGTERM while running"


def celery(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [PYTHON, "-m", "celery", "-A", "cl_tasks", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.stack
def test_celery_inspect_status_control_and_purge(
    jobs_env: dict[str, str], database: Database, start_worker: StartWorker
) -> None:
    worker = start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1", "--prefetch-multiplier", "3")
    running = submit(jobs_env, "ledger_echo", {"ledger_path": "l.txt", "steps": 30, "seconds": 0.5})
    eta = run_client(
        jobs_env,
        (
            "import cl_tasks\n"
            "print(cl_tasks.app.send_task('ledger_echo', kwargs={'ledger_path': 'l.txt'}, queue='ledger_echo',"
            " countdown=120).id)\n"
        ),
    ).strip()
    waiting = [submit(jobs_env, "ledger_echo", {"ledger_path": "l.txt"}) for _ in range(2)]
    wait_until(
        lambda: running in celery(jobs_env, "inspect", "active", "-d", NODE, "-t", "2"), what="active task"
    )
    assert running in celery(jobs_env, "inspect", "active", "-d", NODE, "-t", "3")
    reserved = celery(jobs_env, "inspect", "reserved", "-d", NODE, "-t", "3")
    assert any(job_id in reserved for job_id in waiting), reserved
    assert eta in celery(jobs_env, "inspect", "scheduled", "-d", NODE, "-t", "3")
    assert f"{NODE}: OK" in celery(jobs_env, "inspect", "ping", "-d", NODE, "-t", "3")
    stats = celery(jobs_env, "inspect", "stats", "-d", NODE, "-t", "3")
    assert NODE in stats and f'"transport": "{TRANSPORT_NAME}"' in stats
    registered = celery(jobs_env, "inspect", "registered", "-d", NODE, "-t", "3")
    assert "ledger_echo" in registered and "image_resize" in registered
    assert "'name': 'ledger_echo'" in celery(jobs_env, "inspect", "active_queues", "-d", NODE, "-t", "3")
    assert "1 node online" in celery(jobs_env, "status", "-t", "3")
    added = celery(jobs_env, "control", "add_consumer", "misbehave", "-d", NODE, "-t", "3")
    assert "add consumer misbehave" in added
    assert "'name': 'misbehave'" in celery(jobs_env, "inspect", "active_queues", "-d", NODE, "-t", "3")
    cancelled = celery(jobs_env, "control", "cancel_consumer", "misbehave", "-d", NODE, "-t", "3")
    assert "no longer consuming from misbehave" in cancelled
    for n in range(3):
        insert_job(database, f"purge-{n}", "image_conversion", {})
    run_client(jobs_env, "import cl_tasks\nfor n in range(3): cl_tasks.submit_job('image_conversion', {})\n")
    purged = celery(jobs_env, "purge", "-f", "-Q", "image_conversion")
    assert "Purged 3 messages" in purged
    worker.kill()


def cl_tasks_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "cl_tasks.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cl_tasks_submit_wait_jobs_job_queues(
    jobs_env: dict[str, str], server_dir: Path, start_worker: StartWorker
) -> None:
    start_worker(jobs_env, "-Q", "ledger_echo,misbehave", "-c", "1")
    done = cl_tasks_cli(
        jobs_env,
        "submit",
        "ledger_echo",
        "ledger_path=l.txt",
        "steps=4",
        "seconds=0.6",
        'echo="hi"',
        "--wait",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("job ") and "submitted (ledger_echo)" in lines[0]
    progress = [int(line.split()[1].rstrip("%")) for line in lines if line.startswith("progress ")]
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] == 100
    assert json.loads("\n".join(lines[lines.index("{") :])) == {"echo": "hi"}
    failed = cl_tasks_cli(jobs_env, "submit", "misbehave", "mode=crash", "--wait")
    assert failed.returncode == 1 and "exited with code 3" in failed.stderr
    insert_job(server_dir / "media_store.db", "waiting-1", "image_resize", {"width": 1})
    listed = cl_tasks_cli(jobs_env, "jobs", "--limit", "10")
    assert "JOB ID" in listed.stdout and "waiting-1" in listed.stdout and "completed" in listed.stdout
    as_json = json.loads(cl_tasks_cli(jobs_env, "jobs", "--status", "queued", "--json").stdout)
    assert [job["job_id"] for job in as_json] == ["waiting-1"]
    one = json.loads(cl_tasks_cli(jobs_env, "job", "waiting-1", "--json").stdout)
    assert one["params"] == {"width": 1} and one["status"] == "queued"
    assert "task_type  image_resize" in cl_tasks_cli(jobs_env, "job", "waiting-1").stdout
    queues = json.loads(cl_tasks_cli(jobs_env, "queues", "--json").stdout)
    assert {"task_type": "image_resize", "messages": 0, "queued_jobs": 1} in queues
    assert "QUEUED JOBS" in cl_tasks_cli(jobs_env, "queues").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "image_teleport", "a=1"], "unknown task type 'image_teleport'; known: "),
        (["submit", "image_resize", "width"], "bad parameter 'width': write key=value, e.g. width=64"),
        (["job", "no-such-job"], "no job 'no-such-job'; `cl-tasks jobs` lists them"),
    ],
)
def test_cl_tasks_errors_are_one_line(jobs_env: dict[str, str], args: list[str], message: str) -> None:
    result = cl_tasks_cli(jobs_env, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("cl-tasks: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cl_tasks_without_a_database(jobs_env: dict[str, str], tmp_path: Path) -> None:
    env = {**jobs_env, "CL_SERVER_DIR": str(tmp_path / "empty")}
    for command in (["jobs"], ["queues"], ["job", "x"]):
        result = cl_tasks_cli(env, *command)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"cl-tasks: error: no database at {tmp_path / 'empty' / 'media_store.db'}; start a worker"
            " (scripts/worker.sh) or set CL_SERVER_DIR / DATABASE_URL"
        )
    assert not (tmp_path / "empty").exists()


def test_every_command_has_complete_help(jobs_env: dict[str, str]) -> None:
    top = cl_tasks_cli(jobs_env, "--help").stdout
    for command in ("worker", "submit", "jobs", "job", "queues", "cleanup-mqtt"):
        assert command in top
        text = cl_tasks_cli(jobs_env, command, "--help").stdout
        assert text.startswith(f"usage: cl-tasks {command}")
    assert "--json" in cl_tasks_cli(jobs_env, "jobs", "--help").stdout
    assert "--wait" in cl_tasks_cli(jobs_env, "submit", "--help").stdout


def test_start_worker_sh_runs_a_job_and_announces_w1(
    jobs_env: dict[str, str], server_dir: Path, tmp_path: Path
) -> None:
    prefix = f"cltest-{uuid.uuid4().hex[:8]}/workers"
    env = {**jobs_env, "CAPABILITY_TOPIC_PREFIX": prefix, "MQTT_BROKER": "127.0.0.1"}
    env.pop("WORKER_ID", None)
    subscriber = Subscriber(f"{prefix}/#")
    log = tmp_path / "start_worker.log"
    worker = Worker.__new__(Worker)
    worker.log = log
    worker.process = subprocess.Popen(
        [
            "bash",
            str(ROOT / "start_worker.sh"),
            "--worker-id",
            "w1",
            "--tasks",
            "image_resize",
            "--",
            "-c",
            "1",
            "--logfile",
            str(log),
            "--without-mingle",
        ],
        env=env,
        start_new_session=True,
    )
    try:
        worker.wait_ready()
        insert_job(
            server_dir / "media_store.db",
            "via-script",
            "image_resize",
            {"input_paths": ["missing.png"], "output_paths": ["o.png"], "width": 2, "height": 2},
        )
        assert wait_for_job(server_dir / "media_store.db", "via-script")["status"] == "error"
        found = subscriber.wait_for(lambda ms: any(m.topic == f"{prefix}/w1" and m.payload for m in ms))
        announced = next(m.json() for m in found if m.payload)
        assert announced["id"] == "w1" and announced["capabilities"] == ["image_resize"]
    finally:
        worker.stop()
        subscriber.close()
    bad = subprocess.run(
        ["bash", str(ROOT / "start_worker.sh"), "--workers", "3"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "unknown option '--workers'" in bad.stderr
