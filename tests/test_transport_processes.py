"""Several processes on one database: exactly-once draining, crashes and leases."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from kombu import Connection, Exchange, Producer, Queue

from tests.support import PYTHON, drain_until, subprocess_env, wait_until


def start_consumer(url: str, queue: str, out: Path, *mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "apps.consumer", url, queue, str(out), *mode], env=subprocess_env()
    )


def fill(url: str, queue_name: str, bodies: list[str]) -> None:
    queue = Queue(queue_name, Exchange(queue_name, "direct"), queue_name)
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue_name, declare=[queue])


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    return wait_until(lambda: path.exists() and path.read_text(), timeout, f"{path} was written")


def test_four_consumers_drain_5000_messages_exactly_once(sqlite_url: str, tmp_path: Path) -> None:
    # Given 5,000 distinct messages in one queue
    bodies = [f"m{n}" for n in range(5000)]
    fill(sqlite_url, "bulk", bodies)
    # When four consumer processes drain it at the same time
    outs = [tmp_path / f"consumer{n}.txt" for n in range(4)]
    consumers = [start_consumer(sqlite_url, "bulk", out, "drain") for out in outs]
    for consumer in consumers:
        assert consumer.wait(timeout=300) == 0
    # Then every message was delivered once, none lost, and the work was shared
    received = [line for out in outs for line in out.read_text().splitlines()]
    counts = Counter(received)
    assert sorted(counts) == sorted(bodies)
    assert max(counts.values()) == 1
    assert sum(1 for out in outs if out.read_text()) >= 2


def test_messages_of_a_killed_consumer_return_after_the_visibility_timeout(
    sqlite_url: str, tmp_path: Path
) -> None:
    url = sqlite_url + "?visibility_timeout=2"
    fill(url, "crash", ["a", "b", "c"])
    # Given a consumer holding all three messages unacked
    out = tmp_path / "held.txt"
    holder = start_consumer(url, "crash", out, "hold", "3")
    assert sorted(wait_for_file(out).split()) == ["a", "b", "c"]
    # When it is killed with SIGKILL
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    killed_at = time.monotonic()
    queue = Queue("crash", Exchange("crash", "direct"), "crash")
    with Connection(url) as conn:
        bound = queue(conn.channel())
        # Then nobody gets them while the lease runs…
        assert bound.get() is None
        # …and another consumer receives all of them once it has run out
        got: list[str] = []

        def take_one() -> bool:
            message = bound.get()
            if message is not None:
                assert message.delivery_info["redelivered"] is True
                got.append(message.payload)
                message.ack()
            return len(got) == 3

        wait_until(take_one, 20, "the three messages came back", every=0.1)
    assert sorted(got) == ["a", "b", "c"]
    assert time.monotonic() - killed_at >= 1.0


def test_a_live_consumer_keeps_its_messages_past_the_visibility_timeout(
    sqlite_url: str, tmp_path: Path
) -> None:
    url = sqlite_url + "?visibility_timeout=1"
    fill(url, "long", ["x", "y"])
    # Given a consumer that holds two messages for 4 s, four visibility timeouts
    out = tmp_path / "worker.txt"
    worker = start_consumer(url, "long", out, "work", "2", "4")
    wait_for_file(out)
    queue = Queue("long", Exchange("long", "direct"), "long")
    stolen = []
    with Connection(url) as conn:
        bound = queue(conn.channel())
        # When another consumer keeps trying to take them meanwhile (every 0.1 s, until it ends)
        while worker.poll() is None:
            message = bound.get()
            if message is not None:
                stolen.append(message.payload)
                message.ack()
            time.sleep(0.1)  # the scenario: a try every 0.1 s
    # Then it never gets them: the live worker extended its leases, then acked
    assert worker.returncode == 0
    assert out.read_text() == "claimed\nacked\n"
    assert stolen == []
    with Connection(url) as conn:
        assert queue(conn.channel()).get() is None


CONSUME_UNTIL_STDIN_CLOSES = """
import sys, transports
from kombu import Connection, Exchange, Queue
url, name = sys.argv[1:3]
with Connection(url) as conn:
    conn.Consumer([Queue(name, Exchange(name, "direct"), name, auto_delete=True)], callbacks=[]).consume()
    print("consuming", flush=True)
    sys.stdin.read()
"""


def test_auto_delete_queue_outlives_another_process_consumer(sqlite_url: str) -> None:
    # Given an auto-delete queue consumed by another process and by this one
    queue = Queue("shared", Exchange("shared", "direct"), "shared", auto_delete=True)
    other = subprocess.Popen(
        [PYTHON, "-c", CONSUME_UNTIL_STDIN_CLOSES, sqlite_url, "shared"],
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdout is not None and other.stdout.readline() == "consuming\n"
    received: list[str] = []
    with Connection(sqlite_url) as conn:
        mine = conn.Consumer(
            [queue], callbacks=[lambda body, message: (received.append(body), message.ack())]
        )
        mine.consume()
        channel = conn.channel()
        assert queue(channel).queue_declare(passive=True).consumer_count == 2
        # When the other process stops consuming and exits
        other.communicate("", timeout=30)
        assert other.returncode == 0
        # Then the queue and its binding stay for this consumer
        assert queue(channel).queue_declare(passive=True).consumer_count == 1
        Producer(channel).publish("still routed", exchange="shared", routing_key="shared")
        drain_until(conn, lambda: received == ["still routed"])
        # And once this last consumer goes, so does the queue
        mine.cancel()
        assert not channel.store.has_queue("shared")
