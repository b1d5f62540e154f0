"""Compute jobs end to end: warm runners vs one cold subprocess per job, and pickup latency.

* runner path: a ``celery -A cl_tasks worker -Q image_resize -c 2`` on a fresh
  ``media_store.db``; N rows inserted as the API service does; jobs/s from the first
  ``started_at`` to the last ``completed_at``.
* baseline: the same N jobs, two at a time, each in a new ``python runner.py``
  process of the module's venv (the standalone worker's way).
* pickup: one row at a time inserted into an idle worker's database; the time
  until the row is ``processing`` (``started_at`` minus the insert time).
* API inserts: how long each of the N inserts took (connect, insert, commit with
  SQLite's own busy handler, as the API service does) while the worker runs the
  jobs before it: a worker that hogged the write lock would show here.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from bench.harness import PYTHON, ROOT, api_database, percentile
from cl_tasks.modules import read_module, venv_python

#: Venvs of the bench's compute modules, kept between runs.
VENVS = ROOT / ".venvs-bench"
MODULE = ROOT / "compute_modules" / "image_tools"


def insert_api_row(database: Path, job_id: str, params: dict[str, Any]) -> int:
    """One row as the API inserts it (era A: every NOT NULL column filled, no defaults)."""
    conn = sqlite3.connect(database, timeout=60)
    created = int(time.time() * 1000)
    with conn:
        conn.execute(
            "INSERT INTO jobs (job_id, task_type, params, status, progress, created_at, retry_count,"
            " max_retries) VALUES (?, 'image_resize', ?, 'queued', 0, ?, 0, 3)",
            (job_id, json.dumps(params), created),
        )
    conn.close()
    return created


def _params(n: int) -> dict[str, Any]:
    return {"input_paths": [f"in/{n}.png"], "output_paths": [f"out/{n}.png"], "width": 32, "height": 32}


def _wait_done(database: Path, prefix: str, count: int, timeout: float = 600) -> list[tuple[int, int]]:
    conn = sqlite3.connect(database, timeout=60)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT started_at, completed_at FROM jobs"
                " WHERE job_id LIKE ? AND status IN ('completed', 'error')",
                (f"{prefix}%",),
            ).fetchall()
            if len(rows) >= count:
                return rows
            time.sleep(0.02)
    finally:
        conn.close()
    raise RuntimeError(f"only {len(rows)} of {count} {prefix} jobs ended")


def _start_worker(server: Path, concurrency: int = 2) -> subprocess.Popen[bytes]:
    log = server / "worker.log"
    env = {
        # The caller's environment for what building module venvs needs (a custom CA in
        # SSL_CERT_FILE, proxies, uv's settings); the rest as a plain worker would have it.
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CL_SERVER_DIR": str(server),
        "COMPUTE_VENV_DIR": str(VENVS),
        "BROADCAST_TYPE": "noop",
        "PATH": "/usr/bin:/bin",
    }
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "cl_tasks",
            "worker",
            "-Q",
            "image_resize",
            "-c",
            str(concurrency),
            "-l",
            "info",
            "--logfile",
            str(log),
            "--without-mingle",
            "--without-gossip",
        ],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while "ready." not in (log.read_text() if log.exists() else ""):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cl_tasks worker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return process


def _cold_job(python: Path, server: Path, n: int) -> None:
    spec = {
        "job_id": f"cold-{n}",
        "task_type": "image_resize",
        "root": str(server),
        "params": {
            "input_paths": [str(server / "in" / f"{n}.png")],
            "output_paths": [str(server / "cold" / f"{n}.png")],
            "width": 32,
            "height": 32,
        },
    }
    result = subprocess.run(
        [str(python), str(MODULE / "runner.py")],
        check=False,
        input=json.dumps(spec) + "\n",
        capture_output=True,
        text=True,
        cwd=MODULE,
        timeout=120,
    )
    if '"event": "result"' not in result.stdout:
        raise RuntimeError(f"cold job failed: {result.stdout} {result.stderr}")


def measure(workdir: Path, count: int, pickup_samples: int) -> dict[str, Any]:
    server = workdir / "jobs-data"
    (server / "in").mkdir(parents=True)
    database = server / "media_store.db"
    api_database(database)
    for n in range(count):
        Image.new("RGB", (64, 64), (n % 255, 80, 160)).save(server / "in" / f"{n}.png")
    python = venv_python(VENVS, read_module(MODULE))
    worker = _start_worker(server)
    try:
        inserts = []
        for n in range(count):
            began = time.perf_counter()
            insert_api_row(database, f"run-{n}", _params(n))
            inserts.append(1000 * (time.perf_counter() - began))
        rows = _wait_done(database, "run-", count)
        elapsed_ms = max(done for _, done in rows) - min(started for started, _ in rows)
        runner_rate = count / (elapsed_ms / 1000)
        waits = []
        for n in range(pickup_samples):
            time.sleep(0.05)
            created = insert_api_row(database, f"pick-{n}", _params(n % count))
            started = _wait_done(database, f"pick-{n}", 1)[0][0]
            waits.append(float(started - created))
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    (server / "cold").mkdir()
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda n: _cold_job(python, server, n), range(count)))
    cold_rate = count / (time.perf_counter() - began)
    return {
        "jobs": count,
        "runner_jobs_per_s": runner_rate,
        "cold_jobs_per_s": cold_rate,
        "pickup_p50_ms": percentile(waits, 0.5),
        "pickup_p99_ms": percentile(waits, 0.99),
        "api_insert_p50_ms": percentile(inserts, 0.5),
        "api_insert_p99_ms": percentile(inserts, 0.99),
    }
