"""Contenders and the pieces every measurement uses: workers, clients, logs, CPU time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
#: The API's exact era-A ``jobs`` DDL (every bench's jobs table is made from it).
ERA_A = ROOT / "tests" / "fixtures" / "cl_server" / "jobs_era_a.sql"


def api_database(path: Path) -> None:
    """A fresh ``media_store.db`` as the API's migration makes it: WAL, the era-A ``jobs`` table."""
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(ERA_A.read_text())
    conn.close()


@dataclass(frozen=True)
class Contender:
    """One broker under test: its URL and transport options."""

    name: str
    url: str
    options: dict[str, str] = field(default_factory=dict)
    #: True when waking up relies on a polling loop (fewer latency samples then).
    polls: bool = False

    def env(self, log: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        env["BENCH_BROKER"] = self.url
        env["BENCH_TRANSPORT_OPTIONS"] = ";".join(f"{k}={v}" for k, v in self.options.items())
        if log is not None:
            env["BENCH_LOG"] = str(log)
        return env


def reachable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def contenders(workdir: Path) -> tuple[list[Contender], list[str]]:
    """Every contender that can run here, and notes on those skipped."""
    fs = workdir / "fs"
    (fs / "data").mkdir(parents=True, exist_ok=True)
    (fs / "processed").mkdir(parents=True, exist_ok=True)
    (fs / "control").mkdir(parents=True, exist_ok=True)
    found = [
        Contender("cl_tasks sqlite", f"sqlite:///{workdir / 'ours.db'}"),
        Contender("kombu sqla+sqlite", f"sqla+sqlite:///{workdir / 'sqla.db'}", polls=True),
        Contender(
            "kombu filesystem",
            "filesystem://",
            {
                "data_folder_in": str(fs / "data"),
                "data_folder_out": str(fs / "data"),
                "processed_folder": str(fs / "processed"),
                "store_processed": "False",
                # kombu's default is ./control, which left a folder in the repository.
                "control_folder": str(fs / "control"),
            },
            polls=True,
        ),
    ]
    notes = []
    if reachable("127.0.0.1", 6379):
        found.append(Contender("redis", "redis://127.0.0.1:6379/15"))
    else:
        notes.append("redis skipped: nothing listens on 127.0.0.1:6379")
    if reachable("127.0.0.1", 5672):
        found.append(Contender("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//"))
    else:
        notes.append("rabbitmq skipped: nothing listens on 127.0.0.1:5672")
    return found, notes


def client(contender: Contender, *args: str, timeout: float = 900) -> dict[str, float]:
    """Run ``python -m bench.client ARGS`` for ``contender``; returns its JSON answer."""
    result = subprocess.run(
        [PYTHON, "-m", "bench.client", *args],
        check=False,
        env=contender.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench client {args} on {contender.name} failed:\n{result.stderr[-2000:]}")
    answer: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


class BenchWorker:
    """``celery -A bench.app worker`` for one contender, in its own process group."""

    def __init__(self, contender: Contender, log: Path, workdir: Path, *pool: str) -> None:
        self.logfile = workdir / f"worker-{os.getpid()}-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "bench.app",
                "worker",
                "-l",
                "info",
                "--logfile",
                str(self.logfile),
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "-Q",
                "celery",
                *pool,
            ],
            env=contender.env(log),
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while "ready." not in (self.logfile.read_text() if self.logfile.exists() else ""):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench worker did not start: {self.logfile.read_text()[-2000:]}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the worker and its pool processes so far."""
        return sum(_cpu_of(pid) for pid in _tree(self.process.pid))

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in children:
            pids.extend(_tree(int(child)))
    return pids


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def log_lines(log: Path) -> list[tuple[float, float]]:
    if not log.exists():
        return []
    rows = []
    text = log.read_text()
    # A line being appended right now may be read half-written: only whole lines count.
    for line in text[: text.rfind("\n") + 1].splitlines():
        started, sent = line.split()
        rows.append((float(started), float(sent)))
    return rows


def wait_lines(log: Path, count: int, timeout: float) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = log_lines(log)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
