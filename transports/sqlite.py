"""SQLite WAL transport: ``media_store.db`` as a Celery/kombu broker.

Features
========
* Type: Virtual
* Supports Direct: Yes (bindings are rows, shared by every process on the file)
* Supports Topic: Yes
* Supports Fanout: Yes (so ``celery inspect``/``control``, events and Flower work)
* Unrouted messages: a publish no binding routes (task events while no monitor
  listens) is dropped after one read, without the write lock;
  :meth:`Channel.routes` lets a publisher ask first
* Supports Priority: 0-9, higher first, FIFO within a priority
* Delivery order: what is ready on several queues of one connection (a
  worker's task queues on one channel, its remote-control queue on another) is
  delivered in publish order, priority first: the queues of a channel merge as
  one queue, and a channel claims only what comes before the next message of
  the connection's other channels (:meth:`Transport.deliver_in_order`). So a
  ``revoke`` broadcast published before a task reaches the worker first, as on
  RabbitMQ and Redis. A channel whose prefetch window is full does not hold
  the others back.
* Message properties must be JSON, as the whole message is stored as JSON: one
  that is not (a Python object given to ``Producer.publish``) is dropped with
  one warning naming it, as AMQP drops properties it does not define; a header
  that is not JSON makes the publish raise ``TypeError`` naming it.
* Supports TTL: ``x-message-ttl`` and ``x-expires`` queue arguments, per-message
  ``expiration``. A Celery task's ``expires`` is not a broker TTL: Celery copies
  it into ``expiration``, but dropping the message would leave the caller's
  ``result.get()`` waiting for ever (only a worker that receives an expired
  task stores its ``REVOKED`` result). So a task message (headers ``task`` and
  ``expires``) is dropped ``expired_task_grace`` after its expiration; until
  then a worker busy or stopped at its expiry still receives it, and revokes it
  without running it.
* Auto-delete queues: deleted when their last consumer, in any process, is
  cancelled (or its process died: after ``CONSUMER_TTL``), as on RabbitMQ; a
  passive ``queue_declare`` reports the live consumers of every process
* Delivery: at least once. A claim is one ``BEGIN IMMEDIATE`` transaction that
  leases rows to the consumer; ack deletes the row (acks made while a batch is
  delivered, or in Celery's event loop, are deleted together, in the next
  claim's transaction or within 50 ms: a crash in that instant means a
  redelivery, never a loss); reject with requeue puts it
  back at its place; reject without requeue and undecodable messages move to the
  ``{prefix}dead_letter`` table with the reason. A consumer killed with SIGKILL
  loses nothing: its leases run out after ``visibility_timeout`` and another
  consumer takes the messages. Live consumers extend their leases from a
  background thread, so long tasks and ETA tasks are never redelivered while
  their worker lives.
* Wake-up: an inotify watch on the ``-wal`` file plus ``PRAGMA data_version``
  notice other processes' commits within milliseconds; an idle consumer sleeps
  in ``select`` and costs nothing. ``polling_interval`` is only the fallback.
* Asynchronous: the watch's descriptor joins Celery's event loop, so workers
  run the non-blocking loop (and prefork's non-blocking pool) as on Redis.
* Full disk: a write refused with SQLite's "database or disk is full" raises
  :class:`~transports.store.DatabaseFull`, whose message names the file and
  says to free space. Claims then deliver nothing (no reconnect, so running
  tasks keep their leases), acks and releases are retried by the lease keeper;
  the messages stay in the database and flow again once space is freed.
* File replaced or deleted: noticed by its inode within 0.5 s of the next use,
  logged once, and every connection of the process made again with the old
  file's routing carried over (:mod:`transports.replaced`); while it is missing
  nothing connects (:class:`~transports.replaced.DatabaseGone`), so no empty
  file is made in the API's place.

Connection string
=================
.. code-block::

    sqlite:////absolute/path/media_store.db
    sqlite:///relative/path.db
    sqlite:////absolute/path.db?visibility_timeout=30&polling_interval=0.5

The alias ``sqlite`` is registered when the ``transports`` package is imported;
``broker_transport = "transports.sqlite:Transport"`` works without the import.
The folder must exist; the file is created (mode 0600) if missing. Every
process must be on the same host: SQLite WAL does not work over NFS/SMB.

Transport options
=================
Given in ``broker_transport_options`` or the URL query string (the query
string wins, being the more specific place):

* ``visibility_timeout`` (60.0): seconds a claimed, unacked message stays
  invisible before another consumer may take it; live consumers extend it
  every quarter of it.
* ``polling_interval`` (1.0): seconds between fallback polls when no commit
  is seen (also how soon an expired lease of a dead consumer is noticed).
* ``claim_batch`` (10): most messages claimed in one transaction (bounded by
  the consumer's prefetch). A consumer claims once half its prefetch window is
  free, not for every freed slot: what it holds beyond its running tasks waits
  in the worker anyway, and fewer, larger claims take the write lock less.
* ``table_prefix`` (``kombu_``): prefix of the broker tables.
* ``busy_timeout`` (60.0): seconds to wait for another writer's lock.
* ``synchronous`` (``NORMAL``): ``NORMAL`` never corrupts the database but may
  lose the last commits on power loss; ``FULL`` keeps them at some speed cost.
* ``wal_size_limit`` (4 MiB): past this size (looked at every 50 writes of a
  process and at each sweep) the ``-wal`` file is checkpointed, PASSIVE first,
  then ``TRUNCATE`` with a 5 ms busy timeout only when no reader holds an older
  snapshot, and starts over empty: the API's writers are never held up for
  more than a few milliseconds. While a reader holds an old snapshot the file
  grows; it returns under the bound at the first look after readers finish.
  SQLite's passive auto-checkpoints are off on our connections: under constant
  load they cannot rewind the WAL, which then grows.
* ``sweep_interval`` (30.0): seconds between sweeps of expired messages and
  queues and old dead letters.
* ``dead_letter_retention`` (604800.0, a week): seconds dead letters are kept.
* ``max_inflated_bytes`` (64 MiB): most bytes a compressed body (kombu's
  ``compression`` header: zlib, bz2, lzma) may inflate to. It is inflated
  incrementally (:mod:`transports.compression`) and a body past the bound, a
  compression bomb (3 KB of bz2 can hold 3 GiB), is dead-lettered with one log
  line, never inflated unbounded; codecs without a bounded decoder are refused.
* ``expired_task_grace`` (86400.0, a day): seconds a Celery task message past
  its ``expires`` stays deliverable, so that a worker receives it and stores
  its ``REVOKED`` result (see *Supports TTL*).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from queue import Empty
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.virtual.base import NotEquivalentError

from transports.acks import AckBuffer
from transports.compression import DEFAULT_MAX_INFLATED_BYTES, InflateRefused, inflate
from transports.process import PerProcess
from transports.replaced import DatabaseGone
from transports.store import Claimed, DatabaseFull, DatabaseUnavailable, Place, Store, delivery_key
from transports.wakeup import CommitWatch

logger = logging.getLogger(__name__)

#: Pauses (seconds) between looks at ``data_version`` after a wake-up found no change:
#: the commit that woke us may not be visible yet (about 1.5 ms in all).
COMMIT_SETTLE_PAUSES = (0.0002, 0.0003, 0.001, 0.0)
#: Seconds a deferred ack may wait for the next claim's transaction before it is
#: written on its own (the event loop's acks; see :meth:`Channel._defer_ack`).
ACK_WAIT = 0.05
#: Seconds between runs of the lease keeper at most (it runs more often for short leases).
KEEPER_MAX_TICK = 1.0
#: Seconds a consumer's row outlives its process's last sign of life (renewed every quarter
#: of it): after a crash its auto-delete queues go, and passive declares stop counting it.
CONSUMER_TTL = 20.0


@dataclass(frozen=True)
class Options:
    """The transport options, validated once per connection (see the module docstring)."""

    visibility_timeout: float = 60.0
    polling_interval: float = 1.0
    claim_batch: int = 10
    table_prefix: str = "kombu_"
    busy_timeout: float = 60.0
    synchronous: str = "NORMAL"
    wal_size_limit: int = 4 * 1024 * 1024
    sweep_interval: float = 30.0
    dead_letter_retention: float = 7 * 24 * 3600.0
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES
    expired_task_grace: float = 24 * 3600.0

    @classmethod
    def parse(cls, given: dict[str, Any]) -> Options:
        """Options from a mapping of strings or numbers; unknown keys are ignored."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name not in given:
                continue
            raw = given[field.name]
            kind = type(getattr(cls, field.name))
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"SQLite broker option {field.name}={raw!r} must be a {kind.__name__}"
                ) from None
            if kind is not str and value <= 0:
                raise ValueError(f"SQLite broker option {field.name}={raw!r} must be above 0")
            values[field.name] = value
        return cls(**values)


def parse_url(url: str) -> tuple[Path, dict[str, str]]:
    """Database path and query options of ``sqlite:///path`` / ``sqlite:////abs/path``."""
    parts = urlsplit(url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc or not path:
        raise DatabaseUnavailable(
            f"SQLite broker URL {url!r} has no database path;"
            " write sqlite:////absolute/path/media_store.db (four slashes) or sqlite:///relative.db"
        )
    return Path(path).absolute(), dict(parse_qsl(parts.query))


class SQLiteMessage(virtual.Message):
    """A delivered message; its delivery tag is ``<row id>.<delivery count>``.

    A consumer that rejects it without requeue may first set
    :attr:`dead_letter_reason`: the dead-letter row keeps that reason.
    """

    def __init__(self, payload: dict[str, Any], channel: Any = None, **kwargs: Any) -> None:
        raw = payload
        compression = (payload.get("headers") or {}).get("compression")
        if compression and channel is not None:
            payload = _inflated(payload, channel, str(compression))
        super().__init__(payload, channel=channel, **kwargs)
        self._raw = raw
        self.row_id = int(str(self.delivery_tag).split(".", 1)[0])
        #: The queue this message was claimed from (for dead-lettering).
        self.consumed_from = ""
        #: Why the consumer refused it, kept in the dead-letter row on reject.
        self.dead_letter_reason: str | None = None

    def decode(self) -> Any:
        """Decode the body; a body that cannot be decoded is dead-lettered, then re-raised."""
        try:
            return super().decode()
        except Exception as exc:
            self.channel.dead_letter(self, f"cannot decode body: {exc!r}")
            raise


def _inflated(payload: dict[str, Any], channel: Channel, compression: str) -> dict[str, Any]:
    """``payload`` with its body inflated under ``max_inflated_bytes`` (:class:`InflateRefused` past it).

    kombu would inflate it in ``Message.__init__`` with no bound: the body is inflated
    here instead, and the copy handed on has no ``compression`` header and no body
    encoding left, so kombu takes the bytes as they are.
    """
    properties = dict(payload["properties"])
    body = payload.get("body") or b""
    body = channel.decode_body(body, properties.pop("body_encoding", None))
    if isinstance(body, str):
        body = body.encode("utf-8")
    headers = {key: value for key, value in payload["headers"].items() if key != "compression"}
    inflated = inflate(body, compression, channel.options.max_inflated_bytes)
    return {**payload, "body": inflated, "properties": properties, "headers": headers}


class QoS(virtual.QoS):
    """Prefetch accounting plus the database side of ack, reject and restore."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        message = self._delivered.get(delivery_tag)
        if message is not None:
            self.channel.settle(message.row_id, ack=True)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._delivered.get(delivery_tag)
        if message is not None:
            if requeue:
                self.channel.settle(message.row_id, ack=False)
            else:
                self.channel.dead_letter(message, message.dead_letter_reason or "rejected without requeue")
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        self._flush()
        held = [message.row_id for message in self._delivered.values()]
        self._delivered.clear()
        if not held:
            return []
        try:
            self.channel.store.release(held, self.channel.owner)
        except sqlite3.Error as exc:
            # Their leases run out on their own: nothing is lost, only delayed.
            logger.warning(
                "could not release %d messages now (%s); they return after their lease", len(held), exc
            )
        return []

    def holds_messages(self) -> bool:
        """True while some delivered message awaits its ack (read from the keeper thread)."""
        return len(self._delivered) > len(self._dirty)


class Channel(virtual.Channel):
    """A kombu channel whose queues, bindings and messages live in the database."""

    Message = SQLiteMessage
    QoS = QoS
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.store: Store = connection.store
        self.options: Options = connection.options
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._queue_callbacks: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self._no_ack_queues: set[str] = set()
        self._next_extend = 0.0
        self._next_touch = 0.0
        self._next_heartbeat = time.time() + CONSUMER_TTL / 4
        #: Numbers deliveries, so a row delivered again gets a new delivery tag.
        self._deliveries = itertools.count()
        #: Rows whose ack (True) or release (False) the database refused; upkeep retries them.
        self._unsettled: dict[int, bool] = {}
        #: Acks made while a claimed batch is delivered, or by callbacks of one round of
        #: the event loop, wait here and go in one DELETE (see :meth:`settle`).
        self.acks = AckBuffer()
        self._batching_thread: int | None = None

    # -- entities -------------------------------------------------------------

    def exchange_declare(
        self,
        exchange: str | None = None,
        type: str = "direct",  # noqa: A002 - kombu's signature
        durable: bool = False,
        auto_delete: bool = False,
        arguments: Any = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        type_ = type or "direct"
        name = exchange or f"amq.{type_}"
        if passive:
            if not self.store.has_exchange(name):
                raise self._not_found("exchange", name, "Channel.exchange_declare")
            return
        if type_ not in self.exchange_types:
            raise ChannelError(f"exchange type {type_!r} is not supported (direct, topic, fanout)")
        existing = self.store.declare_exchange(name, type_, durable=durable, auto_delete=auto_delete)
        if existing != type_:
            raise NotEquivalentError(
                f"exchange {name!r} exists with type {existing!r}, not {type_!r}; delete it first"
            )

    def _not_found(self, kind: str, name: str, method: str) -> ChannelError:
        """AMQP's 404 for a passive declare of a missing ``kind`` (as RabbitMQ answers it)."""
        return ChannelError(f"NOT_FOUND - no {kind} {name!r} in {self.store.path}", (50, 10), method, "404")

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self.store.delete_exchange(exchange)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        name = queue or f"amq.gen-{uuid.uuid4()}"
        if passive:
            if not self.store.has_queue(name):
                raise self._not_found("queue", name, "Channel.queue_declare")
        else:
            arguments = kwargs.get("arguments") or {}
            self.store.declare_queue(
                name,
                message_ttl=_milliseconds(arguments, "x-message-ttl"),
                expires=_milliseconds(arguments, "x-expires"),
                auto_delete=bool(kwargs.get("auto_delete")),
            )
        return queue_declare_ok_t(name, self.store.size(name), self.store.consumer_count(name))

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self.store.size(queue):
            return
        self.store.delete_queue(queue)

    def queue_bind(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.store.bind(*_binding(queue, *args, **kwargs))

    def queue_unbind(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.store.unbind(*_binding(queue, *args, **kwargs))

    def list_bindings(self) -> list[tuple[str, str, str]]:
        return self.store.bindings()

    def get_exchanges(self) -> list[str]:
        return sorted({exchange for _, exchange, _ in self.store.bindings()})

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.has_queue(queue)

    # -- publishing -------------------------------------------------------------

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any) -> int:
        """Route and store ``message`` in one transaction; returns the number of queues.

        A message is stored as JSON. A property that is not JSON (a Python object
        passed to ``Producer.publish``) is dropped, with one warning per property
        name: AMQP carries none but its own properties either, so the publish
        succeeds as on RabbitMQ. A header that is not JSON is refused to the
        caller with a ``TypeError`` naming it (RabbitMQ refuses a header it cannot
        encode too); nothing is stored then.
        """
        self._inplace_augment_message(message, exchange, routing_key)
        try:
            return self._route_and_store(message, exchange, routing_key)
        except TypeError:
            _drop_foreign_properties(message["properties"])
        try:
            return self._route_and_store(message, exchange, routing_key)
        except TypeError as exc:
            raise TypeError(
                f"SQLite broker: cannot publish to {exchange!r}/{routing_key!r}: {_not_json(message)};"
                " pass only JSON values (str, numbers, lists, dicts) in headers"
            ) from exc

    def _route_and_store(self, message: dict[str, Any], exchange: str, routing_key: str) -> int:
        return self.store.put(
            exchange or "",
            routing_key or "",
            message,
            priority=self._get_message_priority(message),
            expires_at=self._broker_expiry(message),
        )

    def _broker_expiry(self, message: dict[str, Any]) -> float | None:
        """When the broker drops ``message`` unread: its ``expiration`` property, if any.

        Celery copies a task's ``expires`` into ``expiration``, but the caller of an
        expired task waits for its ``REVOKED`` result, which only a worker that
        receives the message stores. So a Celery task message (headers ``task`` and
        ``expires``) stays deliverable for ``expired_task_grace`` seconds more: a
        worker busy or stopped at its expiry still receives it and revokes it (it
        never runs). A queue's ``x-message-ttl`` applies to every message as it is.
        """
        expiration = message["properties"].get("expiration")
        if expiration is None:
            return None
        expires_at = time.time() + float(expiration) / 1000.0
        headers = message.get("headers") or {}
        if headers.get("task") and headers.get("expires"):
            expires_at += self.options.expired_task_grace
        return expires_at

    def routes(self, exchange: str, routing_key: str) -> bool:
        """Whether a message to ``exchange`` with ``routing_key`` would reach a queue now.

        A read: publishers (Celery's event dispatcher in cl_tasks) may skip building
        a message nobody would receive.
        """
        return not exchange or self.store.routes(exchange, routing_key)

    def encode_body(self, body: Any, encoding: str | None = None) -> tuple[Any, str | None]:
        """Keep text bodies as text (no base64 cost); only binary bodies are base64-encoded."""
        if isinstance(body, bytes):
            try:
                return body.decode("utf-8"), None
            except UnicodeDecodeError:
                return b64encode(body).decode("ascii"), "base64"
        return body, None

    # -- consuming --------------------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Callable[[Any], Any], consumer_tag: str, **kwargs: Any
    ) -> None:
        self._tag_to_queue[consumer_tag] = queue
        self._active_queues.append(queue)
        if no_ack:
            self._no_ack_queues.add(queue)

        def on_claimed(raw_message: dict[str, Any]) -> Any:
            message = self._to_message(queue, raw_message, no_ack)
            if message is not None:
                return callback(message)
            return None

        self._queue_callbacks[queue] = on_claimed
        self._consumers.add(consumer_tag)
        self._reset_cycle()
        self.store.add_consumer(queue, self.owner, consumer_tag, ttl=CONSUMER_TTL)
        self.connection.keeper.register(self)

    def basic_cancel(self, consumer_tag: str) -> None:
        """Cancel a consumer; its auto-delete queue goes only if no other consumer, anywhere, is left."""
        queue = self._tag_to_queue.get(consumer_tag)
        consuming = consumer_tag in self._consumers
        super().basic_cancel(consumer_tag)
        if queue is None or not consuming:
            return
        if queue not in self._active_queues:
            self._queue_callbacks.pop(queue, None)
            self._no_ack_queues.discard(queue)
        try:
            self.store.remove_consumer(queue, self.owner, consumer_tag)
        except sqlite3.Error as exc:
            # The row runs out after CONSUMER_TTL; the sweep then does what this would have.
            logger.warning("SQLite broker: cancelling the consumer of %r not recorded yet: %s", queue, exc)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> SQLiteMessage | None:
        """Claim one message; dead-lettered ones are skipped, so None means the queue is empty."""
        self.connection.keeper.register(self)
        while claimed := self._claim([queue], 1, no_ack):
            message = self._to_message(queue, self._envelope(claimed[0]), no_ack)
            if message is not None:
                return message
        return None

    def drain_events(self, timeout: float | None = None, callback: Any = None) -> None:
        """Deliver the next ready messages of this channel's queues, in order; Empty if none."""
        if not self.connection.deliver_in_order([self]):
            raise Empty()

    def claim_units(self) -> list[tuple[bool, list[str]]]:
        """The queues to claim from now, by no-ack mode (one claim statement each).

        None while the channel has no consumer or its prefetch window is too full
        (:meth:`_room_to_claim`).
        """
        if not (self._consumers and self._room_to_claim()):
            return []
        units: dict[bool, list[str]] = {}
        for queue in self._queue_callbacks:
            units.setdefault(queue in self._no_ack_queues, []).append(queue)
        return list(units.items())

    def deliver_claimed(self, queues: list[str], no_ack: bool, before: Place | None) -> int:
        """Claim a batch of ``queues`` (what comes before ``before``), deliver it in order.

        Returns how many messages were delivered. Acks made while the batch is
        delivered (Celery acks early by default, in the delivery callback) are
        deleted together at the end: one write per batch.
        """
        room = self.qos.can_consume_max_estimate()
        limit = self.options.claim_batch if room is None else min(room, self.options.claim_batch)
        if limit <= 0:
            return 0
        callbacks = dict(self._queue_callbacks)  # a callback may cancel its consumer
        delivered = 0
        self._batching_thread = threading.get_ident()
        try:
            for claimed in self._claim(queues, limit, no_ack, before):
                envelope = self._envelope(claimed)
                if envelope is not None:
                    callbacks[claimed.queue](envelope)
                    delivered += 1
        finally:
            self._batching_thread = None
            self.flush_acks()
        return delivered

    def _room_to_claim(self) -> bool:
        """Whether to claim now: once half the prefetch window is free, not per freed slot.

        Messages held beyond the running ones wait in the worker anyway, so
        claiming for every single ack (one transaction each) only costs; with
        half the window held there is still work for every pool process.
        """
        room = self.qos.can_consume_max_estimate()
        if room is None:
            return True
        return bool(room > 0 and room >= self.qos.prefetch_count // 2)

    def _claim(
        self, queues: list[str], limit: int, no_ack: bool, before: Place | None = None
    ) -> list[Claimed]:
        owner = None if no_ack else self.owner
        lease = self.options.visibility_timeout
        try:
            if owner is not None and self.acks:
                # Acks waiting from the last round go in the claim's transaction: one commit.
                return self._ack_and_claim(self.acks.take(), queues, limit, before)
            return self.store.claim(queues, owner=owner, limit=limit, lease=lease, before=before)
        except DatabaseFull as exc:
            # Not a lost connection (reconnecting would not help, and would drop the leases
            # of running tasks): the messages wait in the database, claimed at a later poll.
            logger.error("%s; claims from queues %s wait", exc, ", ".join(map(repr, queues)))
            return []

    def _ack_and_claim(
        self, row_ids: list[int], queues: list[str], limit: int, before: Place | None
    ) -> list[Claimed]:
        try:
            acked, claimed = self.store.ack_and_claim(
                row_ids,
                queues,
                owner=self.owner,
                limit=limit,
                lease=self.options.visibility_timeout,
                before=before,
            )
        except BaseException:
            self.acks.restore(row_ids)  # not written: they go with the next flush
            raise
        _warn_late_acks(len(row_ids) - acked)
        return claimed

    def _envelope(self, claimed: Claimed) -> dict[str, Any] | None:
        if claimed.payload is None:
            self._dead_letter_row(claimed.row_id, claimed.queue, claimed.error or "unreadable")
            return None
        payload = claimed.payload
        properties = payload["properties"]
        properties["delivery_tag"] = f"{claimed.row_id}.{next(self._deliveries)}"
        delivery_info = properties.setdefault("delivery_info", {})
        delivery_info["redelivered"] = claimed.redelivered
        payload["redelivered"] = claimed.redelivered
        return payload

    def _to_message(self, queue: str, raw: dict[str, Any] | None, no_ack: bool) -> SQLiteMessage | None:
        if raw is None:
            return None
        try:
            message = SQLiteMessage(raw, channel=self)
        except InflateRefused as exc:
            self._dead_letter_row(_row_id(raw), queue, f"refused unread: {exc}", raw=raw)
            return None
        except Exception as exc:
            self._dead_letter_row(_row_id(raw), queue, f"cannot read message: {exc!r}", raw=raw)
            return None
        message.consumed_from = queue
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def settle(self, row_id: int, *, ack: bool) -> None:
        """Ack (delete) or release a claimed row; if the database refuses now, upkeep retries.

        Either way the message leaves the QoS, so a failed ack (a full disk) never
        holds a prefetch slot for ever.
        """
        if ack and self._defer_ack():
            self.acks.add(row_id)
            return
        try:
            self._settle(row_id, ack)
        except sqlite3.Error as exc:
            self._unsettled[row_id] = ack
            action = "ack" if ack else "release"
            logger.warning(
                "SQLite broker: %s of message %s failed, retried until done: %s", action, row_id, exc
            )

    def _defer_ack(self) -> bool:
        """Whether an ack made now can wait for the batch's DELETE.

        Yes inside :meth:`drain_events` (Celery acks early, in the delivery callback),
        and in the event loop's thread (Celery's acks are loop callbacks). The loop's
        acks go in the transaction of the next claim, made once half the prefetch
        window is free (:meth:`_room_to_claim`), or on their own after ``ACK_WAIT``
        (checked every round of the loop; the lease keeper is the backstop). Acks from
        other threads are written at once. A deferred ack that never reaches the
        database (a crash within that moment) means a redelivery, not a loss.
        """
        if self._batching_thread == threading.get_ident():
            return True
        return bool(self.connection.loop_thread == threading.get_ident())

    def flush_acks(self, waited: float = 0.0) -> None:
        """Delete the rows whose acks were deferred (if the first has waited ``waited`` s)."""
        if not self.acks.due(waited):
            return
        row_ids = self.acks.take()
        if not row_ids:
            return
        try:
            acked = self.store.ack_many(row_ids, self.owner)
        except sqlite3.Error as exc:
            self._unsettled.update(dict.fromkeys(row_ids, True))
            logger.warning(
                "SQLite broker: ack of %d messages failed, retried until done: %s", len(row_ids), exc
            )
            return
        _warn_late_acks(len(row_ids) - acked)

    def _settle(self, row_id: int, ack: bool) -> None:
        if not ack:
            self.store.release([row_id], self.owner)
        elif not self.store.ack(row_id, self.owner):
            _warn_late_acks(1)

    def dead_letter(self, message: SQLiteMessage, reason: str) -> None:
        """Move ``message`` (claimed by this channel) to the dead-letter table."""
        queue = message.consumed_from or message.delivery_info.get("routing_key", "")
        self._dead_letter_row(message.row_id, queue, reason, raw=message._raw)

    def _dead_letter_row(
        self, row_id: int, queue: str, reason: str, raw: dict[str, Any] | None = None
    ) -> None:
        no_ack = queue in self._no_ack_queues
        if no_ack and raw is not None:
            self.store.dead_letter_payload(queue, raw, reason)
        else:
            self.store.dead_letter(row_id, None if no_ack else self.owner, reason)
        logger.error("SQLite broker: message %s of queue %r moved to dead letters: %s", row_id, queue, reason)

    # -- upkeep (called from the keeper thread) -----------------------------------

    def upkeep(self, now: float) -> None:
        """Settle refused acks and releases, extend our leases, keep queues alive, sweep when due."""
        # A backstop: deferred acks normally go with a claim, or within a loop round.
        self.flush_acks(waited=ACK_WAIT)
        for row_id, ack in list(self._unsettled.items()):
            self._settle(row_id, ack)
            del self._unsettled[row_id]
        options = self.options
        if now >= self._next_extend and self._qos is not None and self._qos.holds_messages():
            self.store.extend(self.owner, options.visibility_timeout)
            self._next_extend = now + options.visibility_timeout / 4
        if now >= self._next_touch and self._active_queues:
            touch_every = self.store.touch_queues(self._active_queues)
            self._next_touch = now + touch_every
        if now >= self._next_heartbeat and self._consumers:
            self.store.keep_consumers(self.owner, CONSUMER_TTL)
            self._next_heartbeat = now + CONSUMER_TTL / 4
        self.store.sweep_if_due(
            interval=options.sweep_interval, dead_letter_retention=options.dead_letter_retention
        )

    def _settle_unsettled(self) -> None:
        """Last try at refused acks and releases before the channel closes (no keeper after)."""
        for row_id, ack in list(self._unsettled.items()):
            try:
                self._settle(row_id, ack)
            except sqlite3.Error as exc:
                action = "ack" if ack else "release"
                logger.warning(
                    "SQLite broker: %s of message %s failed at close (%s); it returns after its lease",
                    action,
                    row_id,
                    exc,
                )
        self._unsettled.clear()

    def keeper_tick(self) -> float:
        """Seconds between upkeep runs this channel needs."""
        return min(self.options.visibility_timeout / 4, KEEPER_MAX_TICK)

    def close(self) -> None:
        if not self.closed and self.connection is not None:
            self.connection.keeper.unregister(self)
            self.flush_acks()
            self._settle_unsettled()
        super().close()


def _row_id(raw: dict[str, Any]) -> int:
    return int(str(raw["properties"]["delivery_tag"]).split(".", 1)[0])


#: The channel class under a name that ``Transport.Channel`` (kombu's attribute) does not shadow.
SQLiteChannel = Channel


def _binding(
    queue: str, exchange: str | None = None, routing_key: str = "", arguments: Any = None, **_: Any
) -> tuple[str, str, str]:
    """(queue, exchange, routing key) of a kombu ``queue_bind``/``queue_unbind`` call."""
    return queue, exchange or "amq.direct", routing_key or ""


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _drop_foreign_properties(properties: dict[str, Any]) -> None:
    """Remove the properties whose value is not JSON (see :meth:`Channel.basic_publish`)."""
    for name, value in list(properties.items()):
        if not _is_json(value):
            del properties[name]
            _warn_dropped_property(name, type(value).__name__)


@functools.cache
def _warn_dropped_property(name: str, kind: str) -> None:
    """Once per property name and type in a process: a caller publishing it does so every time."""
    logger.warning(
        "SQLite broker: message property %r (a %s) is not JSON and was dropped, as AMQP drops"
        " properties it does not define; put the value in the body or a JSON header to send it"
        " (said once per property)",
        name,
        kind,
    )


def _not_json(message: dict[str, Any]) -> str:
    """What makes ``message`` not JSON, for the error of :meth:`Channel.basic_publish`."""
    headers = message.get("headers") or {}
    bad = [
        f"header {name!r} is a {type(value).__name__}"
        for name, value in headers.items()
        if not _is_json(value)
    ]
    return ", ".join(bad) or "it is not JSON"


def _warn_late_acks(count: int) -> None:
    """Acks of messages whose lease ran out (another consumer may have them now)."""
    if count > 0:
        logger.warning("ack of %d messages came after their lease ran out", count)


def _milliseconds(arguments: dict[str, Any], name: str) -> float | None:
    value = arguments.get(name)
    return None if value is None else float(value) / 1000.0


class _Registry:
    """The channels one process's lease keeper looks after."""

    def __init__(self) -> None:
        self.channels: weakref.WeakSet[Channel] = weakref.WeakSet()
        self.lock = threading.Lock()

    def snapshot(self) -> list[Channel]:
        with self.lock:
            return list(self.channels)


class LeaseKeeper:
    """One daemon thread per process that runs :meth:`Channel.upkeep` of live consumers."""

    def __init__(self) -> None:
        # The thread starts with the first channel of each process (a fork has none).
        self._registry: PerProcess[_Registry] = PerProcess(self._start)

    def _start(self) -> _Registry:
        registry = _Registry()
        threading.Thread(target=self._run, args=(registry,), name="sqlite-broker-leases", daemon=True).start()
        return registry

    def register(self, channel: Channel) -> None:
        registry = self._registry.get()
        with registry.lock:
            registry.channels.add(channel)

    def unregister(self, channel: Channel) -> None:
        registry = self._registry.peek()
        if registry is not None:
            with registry.lock:
                registry.channels.discard(channel)

    @staticmethod
    def _run(registry: _Registry) -> None:
        while True:
            channels = registry.snapshot()
            tick = min((channel.keeper_tick() for channel in channels), default=KEEPER_MAX_TICK)
            for channel in channels:
                try:
                    if not channel.closed:
                        channel.upkeep(time.time())
                except DatabaseFull as exc:
                    logger.error("%s; lease upkeep retries in %.2fs", exc, tick)
                except DatabaseGone:
                    pass  # said once by transports.replaced; the upkeep goes on once the file is back
                except Exception:
                    logger.exception("SQLite broker: lease upkeep failed; retrying in %.2fs", tick)
            time.sleep(tick)


_KEEPER = LeaseKeeper()


class Transport(virtual.Transport):
    """kombu transport over one SQLite database file (see the module docstring)."""

    Channel = Channel
    can_parse_url = True
    default_port = None
    driver_type = "sqlite"
    driver_name = "sqlite3"
    # "database is locked" past busy_timeout, "disk is full", I/O errors: Celery
    # reconnects and carries on once the database is usable again.
    connection_errors = (  # type: ignore[assignment]
        *virtual.Transport.connection_errors,
        sqlite3.OperationalError,
    )
    channel_errors = (*virtual.Transport.channel_errors, sqlite3.IntegrityError)  # type: ignore[assignment]
    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        url = client.hostname if client.hostname and "://" in client.hostname else ""
        path, query = parse_url(url or f"sqlite:///{client.virtual_host or ''}")
        self.options = Options.parse({**client.transport_options, **query})
        self.polling_interval = self.options.polling_interval
        self.store = Store(
            path,
            prefix=self.options.table_prefix,
            busy_timeout=self.options.busy_timeout,
            synchronous=self.options.synchronous,
            wal_size_limit=self.options.wal_size_limit,
        )
        self.keeper = _KEEPER
        self._watch = CommitWatch(path)
        self._seen: tuple[int, int] | None = None
        self._next_poll = 0.0
        #: The thread of Celery's event loop, once registered (acks made there are batched).
        self.loop_thread: int | None = None
        self._loop: Any = None

    def establish_connection(self) -> Any:
        self.store.conn  # noqa: B018 - connect now so a bad path fails here, clearly
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        if self._loop is not None:
            self._loop.on_tick.discard(self._flush_acks)
            self._loop = None
        super().close_connection(connection)
        self._watch.close()
        self.store.close()

    def _changed(self) -> bool:
        """Whether anything committed since we last looked, allowing for a commit in flight.

        inotify fires on the write of a commit's WAL frames, a moment before the
        commit becomes visible (the WAL index is updated after); so an unchanged
        ``data_version`` is looked at again a few times within a millisecond or so.
        """
        for pause in COMMIT_SETTLE_PAUSES:
            seen = self.store.change_token()
            if seen != self._seen:
                self._seen = seen
                return True
            time.sleep(pause)
        return False

    def drain_events(  # type: ignore[override]
        self, connection: Any, timeout: float | None = None, **kwargs: Any
    ) -> None:
        """Deliver ready messages, sleeping on commits (not polling) while there are none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        woken = True
        while True:
            self._watch.drain()
            now = time.monotonic()
            if (self._changed() if woken else False) or now >= self._next_poll:
                self._next_poll = now + self.polling_interval
                if self.deliver_in_order(self.channels):
                    return
            wait = self._next_poll - time.monotonic()
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError()
                wait = min(wait, remaining)
            outcome = self._watch.wait(max(wait, 0.0))
            if outcome == "interrupt":
                raise TimeoutError("interrupted: the process is shutting down")
            woken = outcome == "commit"

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Run inside Celery's event loop: deliver on every commit, poll as a fallback.

        The commit watch's descriptor is a reader of the loop, so a worker
        (prefork included, with its non-blocking pool) never blocks in the
        transport and its remote-control queue is served while tasks run.
        """
        self.loop_thread = threading.get_ident()
        self._loop = loop
        loop.on_tick.add(self._flush_acks)
        fileno = self._watch.fileno()
        if fileno >= 0:
            loop.add_reader(fileno, self._on_commit, fileno)
        loop.call_repeatedly(self.polling_interval, self._deliver_ready, True)
        loop.call_soon(self._deliver_ready, True)

    def _flush_acks(self) -> None:
        """Each round of the event loop, after its callbacks (Celery's acks).

        The acks free prefetch room: claim, with the acks in the claim's transaction
        (one commit); acks no claim took are deleted on their own after ``ACK_WAIT``.
        """
        if any(channel.acks for channel in self.channels):
            self._deliver_ready(True)
            for channel in self.channels:
                channel.flush_acks(waited=ACK_WAIT)

    def _on_commit(self, fileno: int) -> None:
        """The commit watch fired: deliver what became ready."""
        self._watch.drain()
        self._deliver_ready(False)

    def _deliver_ready(self, force: bool) -> None:
        if force:
            self._seen = self.store.change_token()
        elif not self._changed():
            return
        # As many claims as there are channels; our own claims commit, which wakes us again.
        for _ in range(max(len(self.channels), 1)):
            if not self.deliver_in_order(self.channels):
                return

    def deliver_in_order(self, channels: list[SQLiteChannel]) -> int:
        """One claim: the consumer whose next message comes first takes what precedes the others'.

        Messages ready on several queues of a connection (a worker's task queues on
        one channel, its remote-control queue on another) are delivered in publish
        order, as RabbitMQ and Redis deliver them in practice: a ``revoke`` broadcast
        published before a task reaches the worker before the task. One read finds
        the next message of every consumed queue (:meth:`Store.heads`, an index seek
        each, which also spares the write lock when nothing is ready); the channel
        with the first one claims its batch up to the next message of another
        channel, in one transaction. Priorities order a channel's queues together;
        between channels, a higher priority also comes first. Returns how many
        messages were delivered (0: nothing ready, or no room).
        """
        units = [
            (channel, no_ack, queues) for channel in channels for no_ack, queues in channel.claim_units()
        ]
        if not units:
            return 0
        heads = self.store.heads([queue for _, _, queues in units for queue in queues])
        ranked: list[tuple[tuple[int, int], Place, int]] = []
        for index, (_, _, queues) in enumerate(units):
            places = [heads[queue] for queue in queues if queue in heads]
            if places:
                first = min(places, key=delivery_key)
                ranked.append((delivery_key(first), first, index))
        if not ranked:
            for channel, _, _ in units:
                channel.flush_acks()
            return 0
        ranked.sort()
        _, first, index = ranked[0]
        # A queue consumed by two channels heads both: it bounds neither.
        before = next((place for _, place, _ in ranked[1:] if place != first), None)
        channel, no_ack, queues = units[index]
        return channel.deliver_claimed(queues, no_ack, before)

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"hostname": "", "port": None}
