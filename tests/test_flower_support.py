"""Flower's view of a job, fed the events a worker sends (Celery's event state, as Flower keeps it)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from celery.events.state import State

from cl_tasks.flower_support import JobTask

_clock = itertools.count(1)


class JobsState(State):
    """Celery's event state with Flower's task class under cl_tasks (``flower_support.install``)."""

    Task = JobTask


def feed(state: State, kind: str, uuid: str, **fields: Any) -> JobTask:
    now = time.time()
    event = {"type": f"task-{kind}", "uuid": uuid, "hostname": "w1@host", "timestamp": now}
    state.event({**event, "local_received": now, "clock": next(_clock), **fields})
    task: JobTask = state.tasks[uuid]
    return task


def test_a_running_job_is_started_with_its_progress_and_a_finished_one_shows_100() -> None:
    state = JobsState()
    feed(state, "received", "job-1", name="image_resize")
    # A progress event before task-started (they come from different processes) makes it STARTED
    task = feed(state, "progress", "job-1", progress=12.5)
    assert (task.state, task.progress, task.result) == ("STARTED", 12.5, "progress 12.5%")
    feed(state, "started", "job-1")
    task = feed(state, "progress", "job-1", progress=87.5)
    assert (task.state, task.progress, task.result) == ("STARTED", 87.5, "progress 87.5%")
    # Once it succeeded it shows 100 and its result, and a late progress event changes nothing
    feed(state, "succeeded", "job-1", result="{'processed_files': ['o.png']}", runtime=1.0)
    task = feed(state, "progress", "job-1", progress=87.5)
    assert (task.state, task.progress, task.result) == ("SUCCESS", 100.0, "{'processed_files': ['o.png']}")


def test_a_failed_or_revoked_job_shows_no_progress() -> None:
    state = JobsState()
    for uuid, end in (("failed", "failed"), ("revoked", "revoked")):
        feed(state, "received", uuid, name="image_resize")
        feed(state, "started", uuid)
        feed(state, "progress", uuid, progress=40.0)
        task = feed(state, end, uuid, exception="JobError('bad input')")
        assert task.state in ("FAILURE", "REVOKED")
        assert (task.progress, task.result) == (None, None)
