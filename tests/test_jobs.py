"""Compute jobs end to end: the API's jobs table, Celery clients, real workers and Pillow.

Marked ``stack``: these run unchanged on every stack of ``CL_TASKS_TEST_STACK`` (the embedded
SQLite one, RabbitMQ + PostgreSQL, Redis + PostgreSQL); ``scripts/test.sh`` runs each.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from tests import support
from tests.support import Database, StartWorker, insert_job, job_row, run_client, wait_for_job

pytestmark = pytest.mark.stack


def make_image(path: Path, size: tuple[int, int], mode: str = "RGB", fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)
    Image.new(mode, size, color[: len(mode)] if mode != "P" else 3).save(path, format=fmt)


def test_rows_inserted_by_the_api_are_completed(
    server_dir: Path, database: Database, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given the API's database with three queued rows and their images
    make_image(server_dir / "photos" / "wide.jpg", (400, 200))
    make_image(server_dir / "photos" / "logo.png", (50, 40), mode="RGBA")
    before = int(time.time() * 1000)
    insert_job(
        database,
        "resize-exact",
        "image_resize",
        {
            "input_paths": ["photos/wide.jpg"],
            "output_paths": ["out/exact.png"],
            "width": 64,
            "height": 64,
        },
    )
    insert_job(
        database,
        "resize-fit",
        "image_resize",
        {
            "input_paths": ["photos/wide.jpg"],
            "output_paths": ["out/fit.jpg"],
            "width": 100,
            "height": 100,
            "maintain_aspect_ratio": True,
        },
    )
    insert_job(
        database,
        "convert",
        "image_conversion",
        {
            "input_paths": ["photos/logo.png"],
            "output_paths": ["out/logo.jpg"],
            "format": "jpg",
            "quality": 70,
        },
    )
    # When a worker for both task types runs
    start_worker(jobs_env, "-Q", "image_resize,image_conversion", "-c", "2")
    exact = wait_for_job(database, "resize-exact")
    fit = wait_for_job(database, "resize-fit")
    convert = wait_for_job(database, "convert")
    after = int(time.time() * 1000)
    # Then every row is completed with times in ms, progress 100 and the output
    for row in (exact, fit, convert):
        assert row["status"] == "completed", row
        assert row["progress"] == 100 and row["error_message"] is None
        assert before <= row["created_at"] <= row["started_at"] <= row["completed_at"] <= after  # type: ignore[operator]
    # (processed_files: the paths as the job gave them, issue 13 item 6; cl_tasks.staging)
    assert json.loads(str(exact["task_output"])) == {
        "processed_files": ["out/exact.png"],
        "dimensions": {"width": 64, "height": 64},
    }
    assert json.loads(str(fit["task_output"]))["dimensions"] == {"width": 100, "height": 50}
    assert json.loads(str(convert["task_output"])) == {
        "processed_files": ["out/logo.jpg"],
        "format": "jpg",
        "quality": 70,
    }
    # And the images are what was asked for
    with Image.open(server_dir / "out" / "exact.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    with Image.open(server_dir / "out" / "fit.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (100, 50))
    with Image.open(server_dir / "out" / "logo.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (50, 40))
    # And the API's other tables are untouched
    assert support.query(database, "SELECT label, file_path FROM entities") == [
        {"label": "cat", "file_path": "cat.jpg"}
    ]
    assert support.query(database, "SELECT name FROM users") == [{"name": "admin"}]


CLIENT = """
import json, cl_tasks
from cl_tasks import app, image_resize, submit_job
params = dict(input_paths=["in.png"], width=8, height=6)
a = image_resize.delay(output_paths=["out/a.png"], **params)
b = app.send_task("image_resize", kwargs=dict(output_paths=["out/b.png"], **params))
c = submit_job("image_resize", dict(output_paths=["out/c.png"], **params), priority=7)
outputs = {r.id: r.get(timeout=120) for r in (a, b, c)}
# The SUCCESS document is written with the row; it is Celery's whole extended one.
print(json.dumps({"outputs": outputs, "meta": [(r.status, r.name, r.worker, r.kwargs) for r in (a, b, c)]}))
"""


def test_delay_send_task_and_submit_job_create_rows_and_return_results(
    server_dir: Path, database: Database, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    make_image(server_dir / "in.png", (40, 30))
    start_worker(jobs_env, "-Q", "image_resize", "-c", "2")
    answer = json.loads(run_client(jobs_env, CLIENT))
    results = answer["outputs"]
    assert len(results) == 3
    for status, name, worker, kwargs in answer["meta"]:
        assert (status, name, worker) == ("SUCCESS", "image_resize", f"w1@{socket.gethostname()}")
        assert kwargs["width"] == 8
    for job_id, output in results.items():
        row = job_row(database, job_id)
        assert row["status"] == "completed" and row["task_type"] == "image_resize"
        assert json.loads(str(row["task_output"])) == output
        assert output["dimensions"] == {"width": 8, "height": 6}
        assert json.loads(str(row["params"]))["width"] == 8
    priorities = {job_row(database, job_id)["priority"] for job_id in results}
    assert 7 in priorities


def test_two_workers_run_each_of_200_jobs_once(
    server_dir: Path, database: Database, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given 100 rows from the API and 100 jobs submitted through Celery
    for n in range(100):
        insert_job(database, f"api-{n}", "ledger_echo", {"ledger_path": "ledger.txt", "echo": n})
    submitted = json.loads(
        run_client(
            jobs_env,
            (
                "import json, cl_tasks\n"
                "ids = [cl_tasks.submit_job('ledger_echo', {'ledger_path': 'ledger.txt', 'echo': n}).id"
                " for n in range(100)]\n"
                "print(json.dumps(ids))\n"
            ),
        )
    )
    # When two prefork workers with two processes each run them
    workers = [
        start_worker(jobs_env, "-Q", "ledger_echo", "-c", "2", name="a", ready=False),
        start_worker(jobs_env, "-Q", "ledger_echo", "-c", "2", name="b"),
    ]
    job_ids = [f"api-{n}" for n in range(100)] + submitted
    rows = [wait_for_job(database, job_id) for job_id in job_ids]
    # Then every row is completed and every job's runner work happened exactly once
    assert {row["status"] for row in rows} == {"completed"}
    runs = support.ledger_runs(server_dir / "ledger.txt")
    assert set(runs) == set(job_ids)
    assert max(runs.values()) == 1, [job for job, count in runs.items() if count > 1]
    # And every message was acked: after a warm shutdown nothing is left in the broker
    for worker in workers:
        worker.stop()
    assert support.messages_left(jobs_env["CELERY_BROKER_URL"], "ledger_echo") == 0


def test_a_job_of_a_killed_worker_is_finished_by_another(
    server_dir: Path, database: Database, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given a worker in the middle of a 4-second job
    first = start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1", name="first")
    insert_job(database, "long", "ledger_echo", {"ledger_path": "ledger.txt", "steps": 8, "seconds": 0.5})
    support.wait_until(lambda: job_row(database, "long")["progress"] > 0, 60, "the job under way")
    assert job_row(database, "long")["status"] == "processing"
    # (a runner's outputs land when its job ends: the killed run leaves no ledger line)
    assert not (server_dir / "ledger.txt").exists()
    # When it is killed with SIGKILL, with another worker running
    first.kill()
    start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1", name="second")
    # Then the other worker takes the job over and completes it
    row = wait_for_job(database, "long", timeout=120)
    assert row["status"] == "completed" and row["progress"] == 100
    assert (server_dir / "ledger.txt").read_text().split() == ["long"]


def test_progress_reaches_the_row_and_the_celery_state(
    server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1")
    script = (
        "import json, time, cl_tasks\n"
        "from cl_tasks.jobs import job_store\n"
        "r = cl_tasks.submit_job('ledger_echo', {'ledger_path': 'l.txt', 'steps': 6, 'seconds': 0.6})\n"
        "seen = []\n"
        "while not r.ready():\n"
        "    meta = r.backend.get_task_meta(r.id)\n"
        "    if meta['status'] == 'STARTED':\n"
        "        seen.append((meta['result']['progress'], job_store().get(r.id).progress))\n"
        "    time.sleep(0.1)\n"
        "print(json.dumps(seen))\n"
    )
    seen = json.loads(run_client(jobs_env, script))
    celery_progress = sorted({value for value, _ in seen})
    row_progress = {value for _, value in seen}
    assert len(celery_progress) >= 2, seen
    assert all(0 < value < 100 for value in celery_progress[:-1])
    assert any(0 < value < 100 for value in row_progress), seen


EVENTS_CLIENT = """
import json, cl_tasks
from cl_tasks import app
from tests.support import capture_events
with app.connection() as conn:
    seen, listener = capture_events(app, conn, lambda event: event["type"] == "task-succeeded")
    result = cl_tasks.submit_job("ledger_echo", {"ledger_path": "l.txt", "steps": 3, "seconds": 0.6})
    result.get(timeout=60)
    listener.join(timeout=60)
print(json.dumps([(e["type"], e.get("progress")) for e in seen if e.get("uuid") == result.id]))
"""


def test_progress_is_a_task_progress_event_for_flower(
    server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1")
    events = json.loads(run_client(jobs_env, EVENTS_CLIENT))
    progress = [value for kind, value in events if kind == "task-progress"]
    assert len(progress) >= 2 and progress == sorted(progress) and all(0 < p < 100 for p in progress), events
    assert [kind for kind, _ in events][-1] == "task-succeeded"
