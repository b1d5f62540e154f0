"""The ack batch of a SQLite channel (transports.acks.AckBuffer), in-process."""

from __future__ import annotations

import threading

from transports.acks import AckBuffer


def test_acks_are_taken_oldest_first_and_the_buffer_empties() -> None:
    acks = AckBuffer()
    assert not acks and len(acks) == 0
    for row_id in (3, 1, 2):
        acks.add(row_id)
    assert acks and len(acks) == 3
    assert acks.take() == [3, 1, 2]
    assert not acks and acks.take() == []


def test_due_waits_for_the_oldest_ack() -> None:
    acks = AckBuffer()
    assert not acks.due(0.0)  # nothing waits
    acks.add(7)
    assert acks.due(0.0)
    assert not acks.due(3600.0)  # added just now: not an hour old


def test_restored_acks_go_first_and_are_due_at_once() -> None:
    # Given acks whose write failed, and a newer one
    acks = AckBuffer()
    acks.add(5)
    failed = acks.take()
    acks.add(9)
    # When the failed ones are put back
    acks.restore(failed)
    # Then they are written first, and at the next chance however young the batch is
    assert acks.due(3600.0)
    assert acks.take() == [5, 9]
    acks.restore([])
    assert not acks


def test_adds_from_many_threads_lose_nothing() -> None:
    acks = AckBuffer()
    taken: list[int] = []

    def add(start: int) -> None:
        for row_id in range(start, start + 1000):
            acks.add(row_id)
            if row_id % 97 == 0:
                taken.extend(acks.take())

    threads = [threading.Thread(target=add, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken.extend(acks.take())
    assert sorted(taken) == list(range(4000))
