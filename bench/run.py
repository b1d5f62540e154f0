"""Run every benchmark, side by side, and print the table: ``scripts/bench.sh [--quick]``.

Writes ``bench/results/latest.md`` and ``bench/results/latest.json`` too. What is
measured (same Celery settings for every broker, see ``bench/app.py``):

* publish: one client publishing no-op tasks (tasks/s);
* drain solo / drain prefork: a worker (``-P solo``; ``-P prefork -c 2``) emptying a
  queue of no-op tasks, from the first task start to the last (start-up excluded);
* wake p50/p99: publish -> ``task_prerun`` on an idle worker (ms);
* idle CPU: CPU an idle worker (prefork, 2 processes) burns, % of one core;
* backlog 1k / 100k: claim+ack rate (kombu ``basic_get`` + ack) with 1,000 and
  100,000 messages waiting (our transport, Redis, RabbitMQ);
* compute jobs (``bench/jobs.py``): 200 image_resize jobs through our runners vs one
  cold subprocess per job, API row -> ``processing`` pickup latency, and how long the
  API service's own inserts take while the workers write (its share of the write lock).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import jobs
from bench.harness import ROOT, BenchWorker, Contender, client, contenders, wait_lines

RESULTS = ROOT / "bench" / "results"
#: Backlog benchmarks are run only where filling 100,000 messages takes seconds, not hours.
BACKLOG_CONTENDERS = ("cl_tasks sqlite", "redis", "rabbitmq")
#: Tasks per throughput run for polling contenders (kombu's SQLAlchemy and filesystem
#: transports drain a few hundred a second; the filesystem one lists its folder per get).
POLLING_TASKS = 2_000


@dataclass(frozen=True)
class Sizes:
    tasks: int
    latency_samples: int
    polling_latency_samples: int
    idle_seconds: float
    backlog_large: int
    backlog_measured: int
    compute_jobs: int
    pickup_samples: int


FULL = Sizes(20_000, 500, 40, 30.0, 100_000, 1_000, 200, 100)
QUICK = Sizes(2_000, 60, 10, 5.0, 10_000, 500, 40, 20)


def task_count(contender: Contender, sizes: Sizes) -> int:
    """Polling contenders get the smaller count: they drain at hundreds a second."""
    return min(sizes.tasks, POLLING_TASKS) if contender.polls else sizes.tasks


def drain(contender: Contender, workdir: Path, sizes: Sizes, *pool: str) -> float:
    count = task_count(contender, sizes)
    client(contender, "purge")
    client(contender, "publish", str(count - 1))
    log = workdir / f"drain-{time.monotonic_ns()}.log"
    worker = BenchWorker(contender, log, workdir, *pool)
    try:
        rows = wait_lines(log, count, timeout=1800)
    finally:
        worker.stop()
    if len(rows) < count:
        raise RuntimeError(f"{contender.name}: only {len(rows)} of {count} tasks ran")
    starts = [started for started, _ in rows]
    return (len(starts) - 1) / (max(starts) - min(starts))


def wake(contender: Contender, workdir: Path, sizes: Sizes) -> dict[str, float]:
    client(contender, "purge")
    log = workdir / f"wake-{time.monotonic_ns()}.log"
    worker = BenchWorker(contender, log, workdir, "-P", "solo")
    try:
        worker.wait_ready()
        time.sleep(1.0)
        samples = sizes.polling_latency_samples if contender.polls else sizes.latency_samples
        return client(contender, "latency", str(samples), str(log))
    finally:
        worker.stop()


def idle(contender: Contender, workdir: Path, sizes: Sizes) -> float:
    client(contender, "purge")
    worker = BenchWorker(contender, workdir / "idle.log", workdir, "-P", "prefork", "-c", "2")
    try:
        worker.wait_ready()
        time.sleep(3.0)
        before = worker.cpu_seconds()
        time.sleep(sizes.idle_seconds)
        return 100.0 * (worker.cpu_seconds() - before) / sizes.idle_seconds
    finally:
        worker.stop()


def measure(contender: Contender, workdir: Path, sizes: Sizes) -> dict[str, Any]:
    row: dict[str, Any] = {"contender": contender.name}
    client(contender, "purge")
    row["tasks"] = task_count(contender, sizes)
    row["publish_per_s"] = client(contender, "publish", str(row["tasks"]))["rate"]
    client(contender, "purge")
    row["drain_solo_per_s"] = drain(contender, workdir, sizes, "-P", "solo")
    row["drain_prefork2_per_s"] = drain(contender, workdir, sizes, "-P", "prefork", "-c", "2")
    latency = wake(contender, workdir, sizes)
    row["wake_p50_ms"], row["wake_p99_ms"] = latency["p50_ms"], latency["p99_ms"]
    row["wake_samples"] = latency["samples"]
    row["idle_cpu_percent"] = idle(contender, workdir, sizes)
    if contender.name in BACKLOG_CONTENDERS:
        measured = str(sizes.backlog_measured)
        row["backlog_1k_per_s"] = client(contender, "backlog", "1000", measured)["rate"]
        row["backlog_large_per_s"] = client(contender, "backlog", str(sizes.backlog_large), measured)["rate"]
    return row


COLUMNS = [
    ("contender", "broker", "{}"),
    ("tasks", "tasks/run", "{:,}"),
    ("publish_per_s", "publish/s", "{:,.0f}"),
    ("drain_solo_per_s", "drain solo/s", "{:,.0f}"),
    ("drain_prefork2_per_s", "drain prefork -c2/s", "{:,.0f}"),
    ("wake_p50_ms", "wake p50 ms", "{:.1f}"),
    ("wake_p99_ms", "wake p99 ms", "{:.1f}"),
    ("idle_cpu_percent", "idle CPU %", "{:.2f}"),
    ("backlog_1k_per_s", "claim+ack/s 1k waiting", "{:,.0f}"),
    ("backlog_large_per_s", "claim+ack/s large backlog", "{:,.0f}"),
]


def markdown(rows: list[dict[str, Any]], compute: dict[str, Any], notes: list[str], sizes: Sizes) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"tasks/run: no-op tasks per throughput run; large backlog = {sizes.backlog_large:,} messages;"
        f" idle CPU measured over {sizes.idle_seconds:g} s.",
        "",
    ]
    if compute:
        lines += [
            "| compute jobs | value |",
            "|---|---|",
            f"| {compute['jobs']} image_resize 64x64, warm runners (jobs/s)"
            f" | {compute['runner_jobs_per_s']:.1f} |",
            f"| same, one cold subprocess per job (jobs/s) | {compute['cold_jobs_per_s']:.1f} |",
            f"| speed-up | {compute['runner_jobs_per_s'] / compute['cold_jobs_per_s']:.1f}x |",
            f"| API row -> processing p50 (ms) | {compute['pickup_p50_ms']:.1f} |",
            f"| API row -> processing p99 (ms) | {compute['pickup_p99_ms']:.1f} |",
            f"| API insert while the 200 run, p50 (ms) | {compute['api_insert_p50_ms']:.2f} |",
            f"| API insert while the 200 run, p99 (ms) | {compute['api_insert_p99_ms']:.2f} |",
            "",
        ]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", help="comma-separated contender names (default: all)")
    parser.add_argument("--no-compute", action="store_true", help="skip the compute-job benchmark")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="cl_tasks-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        found, notes = contenders(workdir)
        wanted = set(args.only.split(",")) if args.only else None
        for contender in found:
            if wanted and contender.name not in wanted:
                continue
            print(f"== {contender.name}", flush=True)
            rows.append(measure(contender, workdir, sizes))
            print(json.dumps(rows[-1]), flush=True)
        compute = {} if args.no_compute else jobs.measure(workdir, sizes.compute_jobs, sizes.pickup_samples)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(rows, compute, notes, sizes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(table)
    (RESULTS / "latest.json").write_text(
        json.dumps({"rows": rows, "compute": compute, "notes": notes}, indent=2)
    )
    print(table)


if __name__ == "__main__":
    main()
