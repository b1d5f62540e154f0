"""Node names: unique by default, from WORKER_ID when set, and a duplicate refused at start."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.conftest import StartWorker, Worker
from tests.support import run_celery, stop_all, wait_until

HOST = socket.gethostname()


def ready_name(worker: Worker) -> str:
    """The node name a ready worker logged (``<name> ready.``)."""
    worker.wait_ready()
    found = re.search(r"(\S+@\S+) ready\.", worker.text())
    assert found, worker.text()[-2000:]
    return found.group(1)


def answers_ping(env: dict[str, str], name: str) -> bool:
    result = run_celery(env, "inspect", "ping", "-d", name, "-t", "3")
    return f"{name}: OK" in result.stdout


@pytest.mark.stack
def test_workers_started_without_a_name_get_unique_ones(jobs_env: dict[str, str], tmp_path: Path) -> None:
    # Given two workers started on one broker the way scripts/worker.sh does (no -n, no WORKER_ID)
    env = {k: v for k, v in jobs_env.items() if k != "WORKER_ID"}
    workers = [Worker(env, tmp_path / f"unnamed-{n}.log", "-Q", "ledger_echo", "-c", "1") for n in range(2)]
    try:
        names = [ready_name(worker) for worker in workers]
        # Then each has its own name, host plus a short id, and `celery status` counts two nodes
        assert names[0] != names[1]
        assert all(re.fullmatch(rf"celery-[0-9a-f]{{6}}@{re.escape(HOST)}", name) for name in names), names
        assert "2 nodes online" in run_celery(env, "status", "-t", "3").stdout
        # When one stops, Then the other still answers remote control
        workers[0].stop()
        assert answers_ping(env, names[1])
    finally:
        stop_all(workers)


def test_worker_id_names_the_node(jobs_env: dict[str, str], tmp_path: Path) -> None:
    worker = Worker(
        {**jobs_env, "WORKER_ID": "resizer-7"}, tmp_path / "w.log", "-Q", "ledger_echo", "-c", "1"
    )
    try:
        assert ready_name(worker) == f"resizer-7@{HOST}"
    finally:
        worker.stop()


@pytest.mark.stack
def test_a_duplicate_node_name_is_refused_at_start(
    jobs_env: dict[str, str], start_worker: StartWorker, tmp_path: Path
) -> None:
    # Given a live worker named dup@host
    first = start_worker(jobs_env, "-Q", "ledger_echo", "-c", "1", name="dup")
    name = f"dup@{HOST}"
    # When a second worker starts with the same name on the same broker
    second = Worker(jobs_env, tmp_path / "second.log", "-n", "dup@%h", "-Q", "ledger_echo", "-c", "1")
    try:
        code = wait_until(lambda: second.process.poll() is not None and [second.process.returncode], 60)
    finally:
        second.stop()
    # Then it exits non-zero with one line naming the name and the fix, before it was ever ready
    assert code != [0]
    log = second.text()
    refusals = [line for line in log.splitlines() if "another worker named" in line]
    assert len(refusals) == 1, log
    assert f"another worker named {name} is running on this broker" in refusals[0]
    assert "-n NAME@%h or WORKER_ID" in refusals[0]
    assert "Traceback" not in log and "ready." not in log
    # And the first worker goes on answering remote control
    assert answers_ping(jobs_env, name)
    first.stop()
