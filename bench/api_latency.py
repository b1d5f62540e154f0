"""The API's insert latency beside our worker: does sharing media_store.db slow the API?

``python -m bench.api_latency [--seconds S]`` measures, in one run on a fresh
``media_store.db`` with the API's era-A ``jobs`` DDL (tests/fixtures/cl_server):

* a **probe** process standing in for the API service: one persistent connection
  with SQLite's default busy handler (5 s, as SQLAlchemy's pool gives the API),
  inserting one job row every 10 ms and timing each insert + commit; an insert
  that raises ("database is locked") is a failure. Its rows are of a task type
  no worker consumes, so they only measure.
* phases, S seconds each: **no worker**; **no worker, cores busy** (a control: one
  CPU-bound process per core at the runners' niceness, no database, to tell the CPU's
  share of a busy worker's cost from the database's); an **idle worker**
  (``celery -A cl_tasks worker -Q image_resize -c 2``, or ``--concurrency``); a **busy worker** (a
  loader keeps 20 small ``image_resize`` rows queued, as an album upload does);
  **busy + reader**: the same while another API connection holds a read snapshot
  for 20 s (a long request); **busy, after** the reader finished.
* the ``-wal`` file's largest size in each phase and its size at the end of the
  last (it must be back under the transport's bound, 4 MiB, once readers finish).

Targets (issue 14): 0 failures, max < 1 s, busy p99 <= 2x the no-worker p99.
The worker runs with the caller's environment: ``DB_WRITE_SHARE=0.05 python -m
bench.api_latency`` measures a write-lock budget (cl_tasks.writeshare); the result
records the share and the rate of load jobs the busy phases completed.
On a 2-core machine a busy worker keeps both cores busy decoding photos; the control
phase shows what that alone costs the API, database aside.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench.album import BOXES, make_album, resize_params
from bench.harness import PYTHON, ROOT, api_database, percentile
from bench.jobs import _params, _start_worker, insert_api_row

#: Seconds between two probe inserts.
PROBE_EVERY = 0.01
#: SQLite's busy timeout of the API's connections (Python's and SQLAlchemy's default).
API_BUSY_TIMEOUT = 5.0
#: Rows the loader keeps queued during the busy phases.
BACKLOG = 20
#: Seconds the long API request holds its read snapshot.
READER_HOLDS = 20.0
#: A process keeping one core busy at the runners' niceness, with no database at all.
CPU_HOG = "import os\nos.nice(10)\nwhile True: pass"
#: The transport's default ``wal_size_limit``.
WAL_BOUND = 4 * 1024 * 1024


def probe(database: str, seconds: float) -> None:
    """The API's writer: print one JSON object of insert latencies (ms) and failures."""
    conn = sqlite3.connect(database, timeout=API_BUSY_TIMEOUT)
    latencies: list[float] = []
    failures: list[str] = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        began = time.perf_counter()
        try:
            with conn:
                conn.execute(
                    "INSERT INTO jobs (job_id, task_type, params, status, progress, created_at,"
                    " retry_count, max_retries) VALUES (?, 'clip_embedding', '{}', 'queued', 0, ?, 0, 3)",
                    (f"probe-{os.getpid()}-{n}", int(time.time() * 1000)),
                )
        except sqlite3.OperationalError as exc:
            failures.append(str(exc))
        latencies.append(1000 * (time.perf_counter() - began))
        n += 1
        time.sleep(max(0.0, PROBE_EVERY - (time.perf_counter() - began)))
    conn.close()
    print(json.dumps({"latencies": latencies, "failures": failures}))


class Load:
    """Keeps ``BACKLOG`` image_resize rows queued while running; watches the ``-wal``.

    The rows resize small PNGs (64 px: the most jobs, so the most write transactions,
    a second), or with ``photos`` 12 MP JPEGs to the album bench's thumbnail or
    preview (the work of an album upload).
    """

    def __init__(self, server: Path, *, photos: bool = False) -> None:
        self.database = server / "media_store.db"
        self.wal = Path(f"{self.database}-wal")
        self.photos = make_album(server / "photos", BACKLOG) if photos else None
        if self.photos is None:
            (server / "in").mkdir(exist_ok=True)
            for n in range(BACKLOG):
                Image.new("RGB", (64, 64), (n * 10, 80, 160)).save(server / "in" / f"{n}.png")
        self.busy = threading.Event()
        self.stop = threading.Event()
        self.largest_wal = 0
        self.jobs = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _queued(self) -> int:
        conn = sqlite3.connect(self.database, timeout=API_BUSY_TIMEOUT)
        try:
            row = conn.execute(
                "SELECT count(*) FROM jobs WHERE status = 'queued' AND task_type = 'image_resize'"
            )
            return int(row.fetchone()[0])
        finally:
            conn.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.largest_wal = max(self.largest_wal, self.wal.stat().st_size if self.wal.exists() else 0)
            if self.busy.is_set():
                for _ in range(BACKLOG - self._queued()):
                    insert_api_row(self.database, f"load-{self.jobs}", self._params(self.jobs))
                    self.jobs += 1
            self.stop.wait(0.05)

    def _params(self, n: int) -> dict[str, Any]:
        if self.photos is None:
            return _params(n % BACKLOG)
        kind, box = list(BOXES.items())[n % len(BOXES)]
        return resize_params(str(self.photos[n % len(self.photos)]), f"out/{kind}/{n % BACKLOG}.jpg", box)

    def take_largest_wal(self) -> int:
        largest, self.largest_wal = self.largest_wal, 0
        return largest


def _phase(database: Path, seconds: float, load: Load) -> dict[str, Any]:
    result = subprocess.run(
        [PYTHON, "-m", "bench.api_latency", "--probe", str(database), "--seconds", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    found = json.loads(result.stdout)
    latencies: list[float] = found["latencies"]
    return {
        "inserts": len(latencies),
        "failures": len(found["failures"]),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "largest_wal_bytes": load.take_largest_wal(),
    }


def _hold_snapshot(database: Path, seconds: float) -> threading.Thread:
    def hold() -> None:
        conn = sqlite3.connect(database, timeout=API_BUSY_TIMEOUT, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM jobs").fetchall()
        time.sleep(seconds)  # the scenario: a long API request reading one snapshot
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def measure(workdir: Path, seconds: float, concurrency: int = 2, *, photos: bool = False) -> dict[str, Any]:
    server = workdir / "api-latency"
    server.mkdir(parents=True)
    database = server / "media_store.db"
    api_database(database)
    load = Load(server, photos=photos)
    phases: dict[str, dict[str, Any]] = {"no worker": _phase(database, seconds, load)}
    hogs = [subprocess.Popen([PYTHON, "-c", CPU_HOG]) for _ in range(os.cpu_count() or 2)]
    try:
        phases["no worker, cores busy"] = _phase(database, seconds, load)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    worker = _start_worker(server, concurrency)
    try:
        load.take_largest_wal()
        phases["idle worker"] = _phase(database, seconds, load)
        load.busy.set()
        busy_from = time.monotonic()
        phases["busy worker"] = _phase(database, seconds, load)
        reader = _hold_snapshot(database, READER_HOLDS)
        phases["busy + 20 s reader"] = _phase(database, READER_HOLDS, load)
        reader.join()
        phases["busy, after the reader"] = _phase(database, seconds, load)
        busy_seconds = time.monotonic() - busy_from
        wal_at_end = load.wal.stat().st_size if load.wal.exists() else 0
        jobs_run = load.jobs
        completed = _completed_load_jobs(database)
        if completed < BACKLOG:
            # A worker that runs nothing (say, its module's venv failed to build) would
            # make the "busy" phases idle ones: refuse the run rather than record it.
            log = (server / "worker.log").read_text()[-2000:]
            raise RuntimeError(f"the busy worker completed {completed} load jobs; its log ends:\n{log}")
    finally:
        load.stop.set()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        "phases": phases,
        "wal_at_end_bytes": wal_at_end,
        "load_jobs": jobs_run,
        "load_jobs_completed": completed,
        "load_jobs_per_second": completed / busy_seconds,
        "load": "12 MP JPEG thumbnails and previews" if photos else "64 px PNGs",
        # The worker's write-lock budget (cl_tasks.writeshare), from the environment.
        "db_write_share": float(os.environ.get("DB_WRITE_SHARE") or 1),
    }


def _completed_load_jobs(database: Path) -> int:
    conn = sqlite3.connect(database, timeout=API_BUSY_TIMEOUT)
    try:
        row = conn.execute("SELECT count(*) FROM jobs WHERE job_id LIKE 'load-%' AND status = 'completed'")
        return int(row.fetchone()[0])
    finally:
        conn.close()


def markdown(result: dict[str, Any]) -> str:
    base = result["phases"]["no worker"]["p99_ms"]
    lines = [
        "| phase | API inserts | failures | p50 ms | p99 ms | max ms | p99 / no worker | largest -wal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, phase in result["phases"].items():
        cells = [
            name,
            str(phase["inserts"]),
            str(phase["failures"]),
            f"{phase['p50_ms']:.2f}",
            f"{phase['p99_ms']:.2f}",
            f"{phase['max_ms']:.1f}",
            f"{phase['p99_ms'] / base:.2f}x",
            f"{phase['largest_wal_bytes'] / 1e6:.1f} MB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"-wal at the end: {result['wal_at_end_bytes'] / 1e6:.2f} MB (bound {WAL_BOUND / 1e6:.1f} MB);"
        f" load jobs inserted: {result['load_jobs']}, completed: {result['load_jobs_completed']}"
        f" ({result['load_jobs_per_second']:.0f} a second, {result['load']});"
        f" DB_WRITE_SHARE={result['db_write_share']:g}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("-c", "--concurrency", type=int, default=2, help="the worker's -c")
    parser.add_argument("--photos", action="store_true", help="busy with 12 MP photos, not 64 px PNGs")
    parser.add_argument("--probe", metavar="DATABASE", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api-latency.json")
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="cl-tasks-api-latency-") as workdir:
        result = measure(Path(workdir), args.seconds, args.concurrency, photos=args.photos)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
