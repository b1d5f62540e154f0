"""Acks that wait to be written together: the one owner of the ack batch of a channel.

Deleting acked rows one transaction each would cost a commit per message.
A :class:`~transports.sqlite.Channel` instead collects the acks made while it
delivers a batch, or by the callbacks of one round of Celery's event loop, in
an :class:`AckBuffer`, and deletes them in one statement: with its next claim
(in the claim's transaction) or on their own once the oldest has waited
``ACK_WAIT``. An ack that never reaches the database (a crash in that moment)
means a redelivery, never a loss.

The buffer is filled by the consumer's and the event loop's thread and emptied
by whichever thread writes next (the lease keeper too), so every method holds
its lock; it never touches the database itself.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence


class AckBuffer:
    """Row ids of acked messages whose ``DELETE`` is still to be written."""

    def __init__(self) -> None:
        self._row_ids: list[int] = []
        self._since = 0.0  # monotonic time the oldest waiting ack was added
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._row_ids)

    def __len__(self) -> int:
        return len(self._row_ids)

    def add(self, row_id: int) -> None:
        """One more ack to write."""
        with self._lock:
            if not self._row_ids:
                self._since = time.monotonic()
            self._row_ids.append(row_id)

    def take(self) -> list[int]:
        """Every waiting ack, oldest first; the buffer is empty after."""
        with self._lock:
            row_ids, self._row_ids = self._row_ids, []
        return row_ids

    def restore(self, row_ids: Sequence[int]) -> None:
        """Put back acks whose write failed, ahead of newer ones and due at once."""
        if not row_ids:
            return
        with self._lock:
            self._row_ids[:0] = row_ids
            # Due at once, however young the batch. Not 0.0: the monotonic clock starts
            # near zero at boot, so "waited since 0" can be shorter than ``waited``.
            self._since = -math.inf

    def due(self, waited: float) -> bool:
        """Whether some ack waits and the oldest has waited at least ``waited`` seconds."""
        with self._lock:
            return bool(self._row_ids) and time.monotonic() - self._since >= waited
