"""Deliveries the jobs row no longer matches: a cancelled job, a second delivery (issue 14).

Item 4: the API cancels a queued job by deleting its row, also after intake published
it. The worker used to re-create the row from the message and run the job; a message
whose row is gone is now dropped with one line, and no row comes back.

Item 5: a second delivery of a job that a live worker still runs.

A message can be delivered twice (at-least-once: a lost ack, a client publishing the
same job id again). The second delivery finds the row held by a live lease and waits
for it (``ComputeTask.max_retries`` is None). It used to call ``task.retry`` under
Celery's default of 3 retries: after about 10 s the second delivery set the running
job's row ``error: MaxRetriesExceededError`` and the first one's success was lost.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests import support
from tests.support import StartWorker

#: Sixteen seconds of work: longer than Celery's default 3 retries of the waiting
#: delivery (each at most the 3 s job lease + 0.5 s), so the old bound would be hit.
LONG = {"ledger_path": "ledger.txt", "steps": 16, "seconds": 1, "echo": "first"}

PUBLISH_AGAIN = """
from cl_tasks.app import app
app.publish_job("long-job", "ledger_echo", {params}, None)
"""


def test_a_second_delivery_waits_for_the_live_holder_and_the_job_completes(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    server = support.make_server_dir(tmp_path)
    database = server / "media_store.db"
    env = support.compute_env(
        server,
        CELERY_BROKER_URL=f"sqlite:///{database}",
        JOB_LEASE_SECONDS="3",
        BROADCAST_TYPE="noop",
    )
    worker = start_worker(env, "-Q", "ledger_echo", "-c", "2")
    # Given a long job the worker is running, as the API inserted it
    support.insert_job(database, "long-job", "ledger_echo", LONG)
    support.wait_until(
        lambda: support.job_row(database, "long-job")["status"] == "processing", 60, "the job started"
    )
    # When its message is delivered a second time while it runs
    support.run_client(env, PUBLISH_AGAIN.format(params=json.dumps(LONG)))
    # Then the job completes once, with its output, and the second delivery waited all along
    row = support.wait_for_job(database, "long-job", timeout=120)
    assert (row["status"], row["error_message"]) == ("completed", None)
    assert json.loads(row["task_output"])["echo"] == "first"
    waits = worker.text().count("job long-job: another live worker holds it")
    assert waits > 3, f"the second delivery waited {waits} times (Celery's default bound is 3)"
    # And once the second delivery saw the job done, it left: both messages acked, run once
    support.wait_until(lambda: support.broker_left(database, "ledger_echo") == 0, 30, "both messages acked")
    assert support.ledger_runs(server / "ledger.txt")["long-job"] == 1
    assert support.job_row(database, "long-job")["status"] == "completed"


QUICK = {"ledger_path": "ledger.txt"}


def test_a_job_cancelled_by_deleting_its_published_row_never_runs(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    server = support.make_server_dir(tmp_path)
    database = server / "media_store.db"
    env = support.compute_env(server, CELERY_BROKER_URL=f"sqlite:///{database}", BROADCAST_TYPE="noop")
    worker = start_worker(env, "-Q", "ledger_echo", "-c", "1", "--prefetch-multiplier", "1")
    # Given a worker busy with a job, and a second job published behind it
    support.insert_job(database, "busy-job", "ledger_echo", {**QUICK, "steps": 4, "seconds": 0.5})
    support.wait_until(lambda: support.job_row(database, "busy-job")["status"] == "processing", 60, "busy")
    support.insert_job(database, "cancelled-job", "ledger_echo", QUICK)
    support.wait_until(
        lambda: "queued job cancelled-job (ledger_echo) published" in worker.text(), 30, "published"
    )
    # When the API cancels it by deleting its row, and inserts another job after
    support.query(database, "DELETE FROM jobs WHERE job_id = 'cancelled-job'")
    support.insert_job(database, "after-job", "ledger_echo", QUICK)
    # Then the cancelled one is dropped with one line, never re-created nor run
    assert support.wait_for_job(database, "after-job")["status"] == "completed"
    support.wait_until(
        lambda: "job cancelled-job (ledger_echo): its jobs row is gone (cancelled)" in worker.text(),
        30,
        "the cancelled message was dropped",
    )
    assert support.count(database, "SELECT count(*) FROM jobs WHERE job_id = 'cancelled-job'") == 0
    assert support.ledger_runs(server / "ledger.txt") == {"busy-job": 1, "after-job": 1}
    assert support.count(database, "SELECT count(*) FROM cl_tasks_intake WHERE job_id = 'cancelled-job'") == 0
