"""Benchmark client, run in its own process per contender (``BENCH_BROKER``).

``python -m bench.client publish N``      publish N no-op tasks; prints the rate.
``python -m bench.client purge``          empty the ``celery`` queue.
``python -m bench.client latency N LOG``  send N tasks one at a time to an idle
                                          worker; prints p50/p99 of send -> task_prerun.
``python -m bench.client backlog N M``    kombu only: with N messages waiting, time M
                                          claim+ack (basic_get + ack); prints the rate.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from bench.app import app, noop
from bench.harness import log_lines, percentile


def publish(count: int) -> dict[str, float]:
    with app.producer_or_acquire() as producer:
        noop.apply_async(kwargs={"sent": 0.0}, producer=producer)  # connect and declare first
        started = time.perf_counter()
        for _ in range(count):
            noop.apply_async(kwargs={"sent": 0.0}, producer=producer)
        elapsed = time.perf_counter() - started
    return {"rate": count / elapsed, "count": count + 1}


def purge() -> dict[str, float]:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_declare("celery", durable=True, auto_delete=False)
        return {"purged": float(app.control.purge(connection=conn) or 0)}


def latency(samples: int, log: Path) -> dict[str, float]:
    seen = len(log_lines(log))
    waits = []
    with app.producer_or_acquire() as producer:
        for _ in range(samples):
            noop.apply_async(kwargs={"sent": time.time()}, producer=producer)
            deadline = time.monotonic() + 30
            while len(log_lines(log)) <= seen and time.monotonic() < deadline:
                time.sleep(0.001)
            seen += 1
            time.sleep(random.uniform(0.005, 0.02))  # the worker is idle again before the next
    rows = log_lines(log)[-samples:]
    waits = [(started - sent) * 1000 for started, sent in rows]
    return {"p50_ms": percentile(waits, 0.5), "p99_ms": percentile(waits, 0.99), "samples": len(waits)}


def backlog(waiting: int, measured: int) -> dict[str, float]:
    from kombu import Exchange, Queue

    queue = Queue(f"backlog-{waiting}", Exchange(f"backlog-{waiting}", "direct"), "k")
    with app.connection_for_write() as conn:
        bound = queue(conn.channel())
        bound.declare()
        bound.purge()
        producer = conn.Producer()
        for n in range(waiting + measured):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="k")
        started = time.perf_counter()
        for _ in range(measured):
            message = bound.get()
            while message is None:
                message = bound.get()
            message.ack()
        elapsed = time.perf_counter() - started
        bound.purge()
    return {"rate": measured / elapsed}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "publish":
        answer = publish(int(args[0]))
    elif command == "purge":
        answer = purge()
    elif command == "latency":
        answer = latency(int(args[0]), Path(args[1]))
    else:
        answer = backlog(int(args[0]), int(args[1]))
    print(json.dumps(answer))
