"""A consumer process for multi-process tests.

``python -m apps.consumer URL QUEUE OUT MODE [ARG]``:

* ``drain``: consume and ack until the queue stays empty for 2 s; write the
  received bodies, one per line, to OUT.
* ``hold N``: take N messages without acking, write their bodies to OUT, then
  sleep forever (the test kills it).
* ``work N SECONDS``: take N messages, write "claimed" to OUT, keep them for
  SECONDS (longer than the visibility timeout), ack them, write "acked".
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from kombu import Connection, Consumer, Exchange, Queue

import transports  # noqa: F401 - registers sqlite://


def main(url: str, queue_name: str, out: str, mode: str, *args: str) -> None:
    queue = Queue(queue_name, Exchange(queue_name, "direct"), queue_name)
    with Connection(url) as conn:
        if mode == "drain":
            received: list[str] = []

            def on_message(body: str, message: object) -> None:
                received.append(body)
                message.ack()  # type: ignore[attr-defined]

            with Consumer(conn, [queue], prefetch_count=10, callbacks=[on_message]):
                idle_since = time.monotonic()
                while time.monotonic() - idle_since < 2.0:
                    before = len(received)
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.5)
                    if len(received) != before:
                        idle_since = time.monotonic()
            Path(out).write_text("".join(f"{body}\n" for body in received))
            return
        bound = queue(conn.channel())
        held = []
        while len(held) < int(args[0]):
            message = bound.get()
            if message is None:
                time.sleep(0.05)
                continue
            held.append(message)
        if mode == "hold":
            Path(out).write_text("".join(f"{m.payload}\n" for m in held))
            while True:
                time.sleep(60)
        Path(out).write_text("claimed\n")
        time.sleep(float(args[1]))
        for message in held:
            message.ack()
        Path(out).write_text("claimed\nacked\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
