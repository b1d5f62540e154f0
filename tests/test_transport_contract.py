"""The broker contract, run unchanged on the SQLite transport and on RabbitMQ.

Every test takes ``connect`` (a connection factory for the parametrised
``broker_url``) and ``unique`` (entity names), so the same assertions hold on
both: the contract is AMQP's as kombu exposes it, not ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer, Queue
from kombu.message import Message

from tests.support import drain_until, poll

Names = Callable[[str], str]
Connect = Callable[[], Connection]


def get_one(queue: Queue, *, no_ack: bool = False, timeout: float = 3.0) -> Message | None:
    """basic_get until a message comes or ``timeout`` passes (RabbitMQ routes asynchronously)."""
    return poll(lambda: queue.get(no_ack=no_ack), timeout, every=0.02)


def drain(queue: Queue, *, expect: int, timeout: float = 3.0) -> list[Any]:
    """Get and ack ``expect`` messages; returns their payloads."""
    bodies = []
    for _ in range(expect):
        message = get_one(queue, timeout=timeout)
        assert message is not None, f"only {len(bodies)} of {expect} messages arrived"
        bodies.append(message.payload)
        message.ack()
    return bodies


def assert_redelivered(queue: Queue, body: Any) -> None:
    """The next message of ``queue`` is ``body`` again, marked redelivered; it is acked."""
    again = get_one(queue)
    assert again is not None and again.payload == body
    assert again.delivery_info["redelivered"] is True
    again.ack()


def ready_count(queue: Queue, expect: int) -> int:
    """Messages ready in ``queue``, once there are ``expect`` (or 3 s passed)."""

    def ready() -> int:
        return int(queue.queue_declare(passive=True).message_count)

    poll(lambda: ready() >= expect, 3, every=0.02)
    return ready()


def declared(conn: Connection, queue: Queue) -> Queue:
    bound = queue(conn.channel())
    bound.declare()
    return bound


@pytest.fixture
def confirming_publisher(broker_url: str) -> Iterator[Connection]:
    """A connection whose publishes return once the broker has the message.

    RabbitMQ's queues are separate processes: messages published in a burst to two
    queues reach a consumer queue by queue. With publisher confirms, each message is
    in its queue (and on its way to the consumer) before the next is published, as a
    revoke broadcast is before the task a client sends after it; on our transport a
    publish returns after its commit anyway (the option is ignored).
    """
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        conn.connect()
        yield conn


def publish(conn: Connection, body: Any, exchange: Exchange | str, routing_key: str, **kw: Any) -> None:
    # One channel per connection: RabbitMQ orders messages per channel only.
    Producer(conn.default_channel).publish(body, exchange=exchange, routing_key=routing_key, **kw)


def test_publish_consume_ack(connect: Connect, unique: Names) -> None:
    # Given a durable direct queue with three messages
    exchange = Exchange(unique("ex"), "direct")
    queue = Queue(unique("q"), exchange, "k")
    conn = connect()
    declared(conn, queue)
    for n in range(3):
        publish(conn, {"n": n}, exchange, "k")
    # When a consumer drains them through drain_events and acks
    received: list[Any] = []
    with conn.Consumer([queue], callbacks=[lambda body, msg: (received.append(body), msg.ack())]):
        drain_until(conn, lambda: len(received) >= 3)
    # Then they arrive in order and, acked, are gone for everyone: even once the consumer's
    # connection is closed (which would return unacked ones)
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}]
    conn.release()
    fresh = declared(connect(), queue)
    assert get_one(fresh, timeout=0.3) is None
    fresh.delete()


def test_unacked_message_returns_when_the_connection_closes(connect: Connect, unique: Names) -> None:
    queue = Queue(unique("q"), Exchange(unique("ex"), "direct"), "k")
    first = connect()
    declared(first, queue)
    publish(first, "keep me", queue.exchange, "k")
    message = get_one(declared(first, queue))
    assert message is not None and message.payload == "keep me"
    # When the consumer goes away without acking
    first.release()
    # Then the message is delivered again, marked redelivered
    assert_redelivered(declared(connect(), queue), "keep me")


def test_reject_with_requeue_redelivers(connect: Connect, unique: Names) -> None:
    queue = Queue(unique("q"), Exchange(unique("ex"), "direct"), "k")
    conn = connect()
    bound = declared(conn, queue)
    publish(conn, "again", queue.exchange, "k")
    message = get_one(bound)
    assert message is not None
    message.reject(requeue=True)
    assert_redelivered(bound, "again")


def test_reject_without_requeue_removes(connect: Connect, unique: Names) -> None:
    queue = Queue(unique("q"), Exchange(unique("ex"), "direct"), "k")
    conn = connect()
    bound = declared(conn, queue)
    publish(conn, "drop", queue.exchange, "k")
    publish(conn, "next", queue.exchange, "k")
    message = get_one(bound)
    assert message is not None and message.payload == "drop"
    message.reject(requeue=False)
    assert drain(bound, expect=1) == ["next"]
    assert get_one(bound, timeout=0.3) is None


def test_purge_and_size(connect: Connect, unique: Names) -> None:
    queue = Queue(unique("q"), Exchange(unique("ex"), "direct"), "k")
    conn = connect()
    bound = declared(conn, queue)
    for n in range(5):
        publish(conn, n, queue.exchange, "k")
    assert ready_count(bound, 5) == 5
    assert bound.purge() == 5
    assert bound.queue_declare(passive=True).message_count == 0
    assert get_one(bound, timeout=0.3) is None


def test_passive_declare_of_missing_queue_fails(connect: Connect, unique: Names) -> None:
    conn = connect()
    with pytest.raises(conn.channel_errors):
        Queue(unique("missing"))(conn.channel()).queue_declare(passive=True)


def test_direct_routing(connect: Connect, unique: Names) -> None:
    exchange = Exchange(unique("direct"), "direct")
    q_a = Queue(unique("a"), exchange, "a")
    q_b = Queue(unique("b"), exchange, "b")
    conn = connect()
    bound_a, bound_b = declared(conn, q_a), declared(conn, q_b)
    publish(connect(), "to a", exchange, "a")
    publish(connect(), "to nobody", exchange, "c")
    assert drain(bound_a, expect=1) == ["to a"]
    assert get_one(bound_b, timeout=0.3) is None
    assert get_one(bound_a, timeout=0.3) is None


def test_topic_routing(connect: Connect, unique: Names) -> None:
    exchange = Exchange(unique("topic"), "topic")
    all_stock = Queue(unique("all"), exchange, "stock.#")
    nyse = Queue(unique("nyse"), exchange, "*.nyse")
    conn = connect()
    bound_all, bound_nyse = declared(conn, all_stock), declared(conn, nyse)
    publisher = connect()
    for key in ("stock.us.nyse", "stock.nyse", "bond.nyse", "stock", "weather.today"):
        publish(publisher, key, exchange, key)
    assert sorted(drain(bound_all, expect=3)) == ["stock", "stock.nyse", "stock.us.nyse"]
    assert sorted(drain(bound_nyse, expect=2)) == ["bond.nyse", "stock.nyse"]
    assert get_one(bound_all, timeout=0.3) is None
    assert get_one(bound_nyse, timeout=0.3) is None


def test_fanout_reaches_every_bound_queue(connect: Connect, unique: Names) -> None:
    exchange = Exchange(unique("fanout"), "fanout")
    queues = [Queue(unique(f"f{n}"), exchange) for n in range(3)]
    bound = [declared(connect(), queue) for queue in queues]
    publish(connect(), "hello all", exchange, "ignored")
    for each in bound:
        assert drain(each, expect=1) == ["hello all"]


def test_priorities_high_first_fifo_within(connect: Connect, unique: Names) -> None:
    exchange = Exchange(unique("prio"), "direct")
    queue = Queue(unique("q"), exchange, "k", queue_arguments={"x-max-priority": 9})
    conn = connect()
    bound = declared(conn, queue)
    for body, priority in [("low-1", 1), ("high-1", 9), ("mid", 5), ("low-2", 1), ("high-2", 9), ("zero", 0)]:
        publish(conn, body, exchange, "k", priority=priority)
    assert ready_count(bound, 6) == 6  # all routed before the first get
    assert drain(bound, expect=6) == ["high-1", "high-2", "mid", "low-1", "low-2", "zero"]


def test_queue_message_ttl(connect: Connect, unique: Names) -> None:
    # Given a queue whose messages live 300 ms, and beside it one without a TTL
    exchange = Exchange(unique("ttl"), "direct")
    queue = Queue(unique("q"), exchange, "k", queue_arguments={"x-message-ttl": 300})
    control = Queue(unique("control"), exchange, "k")
    conn = connect()
    bound, bound_control = declared(conn, queue), declared(conn, control)
    # When a message routed to both is older than the TTL
    publish(conn, "short-lived", exchange, "k")
    time.sleep(0.8)  # the scenario: the message outlives the TTL
    # Then it is gone from the TTL queue, and still in the other
    assert get_one(bound, timeout=0.3) is None
    assert drain(bound_control, expect=1) == ["short-lived"]


def test_per_message_expiration(connect: Connect, unique: Names) -> None:
    exchange = Exchange(unique("exp"), "direct")
    queue = Queue(unique("q"), exchange, "k")
    conn = connect()
    bound = declared(conn, queue)
    publish(conn, "expires", exchange, "k", expiration=0.3)
    publish(conn, "stays", exchange, "k")
    time.sleep(0.8)  # the scenario: "expires" outlives its expiration
    assert drain(bound, expect=1) == ["stays"]


def test_queue_expiry_removes_unused_queue(connect: Connect, unique: Names) -> None:
    # Given a queue that expires after 1 s unused, and beside it one that does not expire
    queue = Queue(
        unique("expiring"), Exchange(unique("ex"), "direct"), "k", queue_arguments={"x-expires": 1000}
    )
    control = Queue(unique("control"), queue.exchange, "k")
    conn = connect()
    declared(conn, queue)
    declared(conn, control)
    publish(conn, "lost with the queue", queue.exchange, "k")
    time.sleep(2.5)  # the scenario: unused for longer than its expiry
    # Then the expiring queue is gone, and the other is still there with its message
    with pytest.raises(conn.channel_errors):
        queue(connect().channel()).queue_declare(passive=True)
    assert ready_count(control(connect().channel()), 1) == 1


def test_bindings_are_shared_between_connections(connect: Connect, unique: Names) -> None:
    # Given a queue bound on one connection
    exchange = Exchange(unique("shared"), "direct")
    queue = Queue(unique("q"), exchange, "k")
    bound = declared(connect(), queue)
    # When another connection publishes to the exchange without declaring anything
    publish(connect(), "routed", exchange.name, "k")
    # Then the first connection receives it
    assert drain(bound, expect=1) == ["routed"]


def consumer_count(connect: Connect, queue: Queue, expect: int) -> int:
    """Live consumers of ``queue`` by a passive declare, once there are ``expect`` (or 3 s passed)."""

    def count() -> int:
        return int(queue(connect().channel()).queue_declare(passive=True).consumer_count)

    poll(lambda: count() == expect, 3, every=0.02)
    return count()


def test_auto_delete_queue_lives_until_its_last_consumer_goes(connect: Connect, unique: Names) -> None:
    # Given an auto-delete queue with four messages, consumed on two connections (one each at a time)
    exchange = Exchange(unique("ad"), "direct")
    queue = Queue(unique("q"), exchange, "k", auto_delete=True)
    first, second = connect(), connect()
    declared(first, queue)
    for n in range(4):
        publish(first, n, exchange, "k")
    ready_count(declared(first, queue), 4)
    received: list[Any] = []
    leaving = first.Consumer([queue], callbacks=[lambda body, msg: None], prefetch_count=1)
    staying = second.Consumer(
        [queue], callbacks=[lambda body, msg: (received.append(body), msg.ack())], prefetch_count=1
    )
    leaving.consume()
    staying.consume()
    assert consumer_count(connect, queue, 2) == 2
    # When the first consumer is cancelled and its connection closed
    leaving.cancel()
    first.release()
    # Then the queue, its binding and its messages are still there for the other consumer
    assert consumer_count(connect, queue, 1) == 1
    publish(connect(), 4, exchange, "k")
    drain_until(second, lambda: len(received) >= 5, what="the survivor received every message")
    assert sorted(received) == [0, 1, 2, 3, 4]
    # When the last consumer goes, Then the queue is deleted
    staying.cancel()

    def gone() -> bool:
        try:
            queue(connect().channel()).queue_declare(passive=True)
        except connect().channel_errors:
            return True
        return False

    assert poll(gone, 3, every=0.05), "the auto-delete queue outlived its last consumer"


def test_a_consumer_of_two_queues_gets_their_messages_in_publish_order(
    connect: Connect, unique: Names, confirming_publisher: Connection
) -> None:
    # Given one consumer of two queues (as a worker consumes several task queues)
    exchange = Exchange(unique("order"), "direct")
    queues = [Queue(unique("a"), exchange, "a"), Queue(unique("b"), exchange, "b")]
    conn = connect()
    received: list[Any] = []
    consumer = conn.Consumer(queues, callbacks=[lambda body, msg: (received.append(body), msg.ack())])
    consumer.consume()
    # When messages are published to them alternately while it is not draining
    publisher = confirming_publisher
    sent = [f"{key}{n}" for n in range(6) for key in ("a", "b")]
    for body in sent:
        publish(publisher, body, exchange, body[0])
    # Then it receives them in publish order, not queue by queue
    drain_until(conn, lambda: len(received) >= len(sent))
    consumer.cancel()
    assert received == sent


def test_consumers_on_two_channels_of_a_connection_get_messages_in_publish_order(
    connect: Connect, unique: Names, confirming_publisher: Connection
) -> None:
    # Given two consumers on two channels of one connection (a worker's task queue and
    # its remote-control queue), each of one queue
    exchange = Exchange(unique("order"), "direct")
    tasks, control = Queue(unique("tasks"), exchange, "tasks"), Queue(unique("control"), exchange, "control")
    conn = connect()
    received: list[Any] = []

    def record(body: Any, message: Message) -> None:
        received.append(body)
        message.ack()

    consumers = [
        conn.Consumer([queue], channel=conn.channel(), callbacks=[record]) for queue in (tasks, control)
    ]
    for consumer in consumers:
        consumer.consume()
    # When a control message is published before and after each task
    publisher = confirming_publisher
    sent = ["control0", "tasks0", "tasks1", "control1", "tasks2", "control2", "control3", "tasks3"]
    for body in sent:
        publish(publisher, body, exchange, body[:-1])
    # Then the connection delivers them in publish order, across its channels
    drain_until(conn, lambda: len(received) >= len(sent))
    for consumer in consumers:
        consumer.cancel()
    assert received == sent
