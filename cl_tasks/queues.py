"""Queue depths, read through kombu from whichever broker is configured.

One answer for ``cl-tasks queues`` and for Flower's broker page (on the SQLite
transport Flower has no broker client of its own): a passive declare per queue,
and 0 for a queue that does not exist (yet).
"""

from __future__ import annotations

from collections.abc import Iterable

from kombu.connection import Connection


def queue_depth(conn: Connection, name: str) -> int:
    """Messages waiting in queue ``name`` (0 when it does not exist)."""
    try:
        return int(conn.default_channel.queue_declare(name, passive=True).message_count)
    except conn.channel_errors:
        return 0


def queue_depths(conn: Connection, names: Iterable[str]) -> dict[str, int]:
    """:func:`queue_depth` of each of ``names``."""
    return {name: queue_depth(conn, name) for name in names}
