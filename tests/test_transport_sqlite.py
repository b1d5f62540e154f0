"""What the SQLite transport promises beyond the shared contract.

Dead letters, bad database paths, coexistence with the API service's tables,
no-ack queues, wake-up without polling, fork and thread safety, the WAL bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.utils.dispatch import Signal
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

from tests import api_schema
from tests.support import (
    PYTHON,
    WAL_BOUND,
    count,
    drain_until,
    make_api_database,
    query,
    sqlite_broker_path,
    subprocess_env,
)
from transports.sqlite import ACK_WAIT, Channel, Options, Transport
from transports.store import DatabaseUnavailable, Store

EXCHANGE = Exchange("tasks", "direct")
QUEUE = Queue("work", EXCHANGE, "work")
#: Seconds from a commit in another process to the consumer's wake-up, at most (the fallback
#: poll is 60 s away, the drain's timeout 30 s).
WAKE_BOUND = 5.0


def db_path(url: str) -> Path:
    path = sqlite_broker_path(url)
    assert path is not None, url
    return path


def stored(url: str) -> int:
    """Messages in the broker table, taken or not."""
    return count(db_path(url), "SELECT count(*) FROM kombu_message")


def drain_queue(bound: Queue) -> list[object]:
    """Get and ack every message of ``bound`` until it is empty; their payloads."""
    bodies = []
    while (message := bound.get()) is not None:
        bodies.append(message.payload)
        message.ack()
    return bodies


def publish(conn: Connection, *bodies: object, **kwargs: object) -> None:
    producer = Producer(conn.channel())
    for body in bodies:
        producer.publish(body, exchange=EXCHANGE, routing_key="work", declare=[QUEUE], **kwargs)


def test_stored_payload_that_is_not_a_message_is_dead_lettered(sqlite_url: str) -> None:
    # Given a garbage row between two good messages
    with Connection(sqlite_url) as conn:
        publish(conn, "before")
        with sqlite3.connect(db_path(sqlite_url)) as raw:
            raw.execute(
                "INSERT INTO kombu_message (queue, payload, created_at) VALUES ('work', '{not json', 0)"
            )
        publish(conn, "after")
        # When a consumer drains the queue
        bodies = drain_queue(QUEUE(conn.channel()))
    # Then the good ones arrive and the garbage sits in the dead-letter table with a reason
    assert bodies == ["before", "after"]
    dead = query(db_path(sqlite_url), "SELECT queue, payload, reason FROM kombu_dead_letter")
    assert len(dead) == 1
    assert dead[0]["queue"] == "work" and dead[0]["payload"] == "{not json"
    assert "not a message" in str(dead[0]["reason"])
    assert stored(sqlite_url) == 0


def test_body_refused_by_the_consumer_is_dead_lettered(sqlite_url: str) -> None:
    # Given a pickled message followed by a JSON one, and a JSON-only consumer
    with Connection(sqlite_url) as conn:
        publish(conn, {"evil": "pickle"}, serializer="pickle")
        publish(conn, {"good": "json"})
        seen: list[object] = []
        errors: list[Exception] = []

        def on_decode_error(message: object, exc: Exception) -> None:
            errors.append(exc)
            message.ack()  # type: ignore[attr-defined] - what Celery does

        with Consumer(
            conn,
            [QUEUE],
            accept=["json"],
            callbacks=[lambda body, message: (seen.append(body), message.ack())],
            on_decode_error=on_decode_error,
        ):
            drain_until(conn, lambda: bool(seen))
    # Then the pickle never reaches the callback, the JSON one does, the pickle is kept
    assert seen == [{"good": "json"}]
    assert len(errors) == 1
    dead = query(db_path(sqlite_url), "SELECT reason, payload FROM kombu_dead_letter")
    assert len(dead) == 1
    assert "cannot decode body" in str(dead[0]["reason"])
    assert json.loads(dead[0]["payload"])["content-type"] == "application/x-python-serialize"
    assert stored(sqlite_url) == 0


def test_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "media_store.db"
    with pytest.raises(DatabaseUnavailable, match=r"folder .*nope.* does not exist; create it"):
        Connection(f"sqlite:///{missing}").connect()


def test_file_that_is_not_sqlite_is_one_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "media_store.db"
    bogus.write_text("this is a text file, not a database\n" * 10)
    with pytest.raises(DatabaseUnavailable, match="is not an SQLite database"):
        Connection(f"sqlite:///{bogus}").connect()
    assert bogus.read_text().startswith("this is a text file")


def connect_error_as_nobody(url: str) -> str:
    """The error text of connecting to ``url`` from a forked child running as "nobody".

    Root ignores file modes, so the child drops to an unprivileged user first
    (no exec needed: the interpreter and kombu are already loaded).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        text = "connected"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            Connection(url).connect()
        except Exception as exc:
            text = str(exc)
        os.write(write_end, text.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return text


def test_unwritable_database_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    database = folder / "media_store.db"
    sqlite3.connect(database).execute("CREATE TABLE t (x)").connection.close()
    database.chmod(0o444)
    for part in [folder, *folder.parents]:
        part.chmod(part.stat().st_mode | 0o005)
    error = connect_error_as_nobody(f"sqlite:///{database}")
    assert error == (
        f"SQLite broker: database {database} is not readable and writable by this user;"
        " fix its owner or permissions"
    )


def test_unwritable_folder_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o755)
    for part in [folder, *folder.parents]:
        part.chmod(part.stat().st_mode | 0o005)
    error = connect_error_as_nobody(f"sqlite:///{folder / 'media_store.db'}")
    assert f"cannot create database {folder / 'media_store.db'}: folder {folder} is not writable" in error


def test_broker_tables_sit_beside_the_api_tables_without_touching_them(tmp_path: Path) -> None:
    # Given a media_store.db the API service made (its exact jobs DDL, era B), with its rows
    database = tmp_path / "media_store.db"
    make_api_database(database, "b")
    with sqlite3.connect(database) as api:
        api_schema.insert_into(api, api_schema.api_row("j1", "image_resize", {}, "b"))
    schema_before = sorted(
        sqlite3.connect(database).execute("SELECT name, sql FROM sqlite_master").fetchall()
    )
    # When the broker is used on the same file
    url = f"sqlite:///{database}"
    with Connection(url) as conn:
        publish(conn, "hello")
        message = QUEUE(conn.channel()).get()
        assert message is not None
        message.ack()
    # Then the API's tables are as they were and the broker's are prefixed
    with sqlite3.connect(database) as check:
        schema_after = sorted(check.execute("SELECT name, sql FROM sqlite_master").fetchall())
        assert check.execute("SELECT job_id, status, priority FROM jobs").fetchall() == [("j1", "queued", 5)]
        assert check.execute("SELECT label, file_path FROM entities").fetchall() == [("cat", "cat.jpg")]
    new = {name for name, _ in set(schema_after) - set(schema_before)}
    assert set(schema_before) <= set(schema_after)
    assert new and all(name.startswith(("kombu_", "sqlite_")) for name in new), new


def test_table_prefix_option(sqlite_url: str) -> None:
    with Connection(sqlite_url, transport_options={"table_prefix": "broker_"}) as conn:
        publish(conn, "x")
    names = {
        row["name"] for row in query(db_path(sqlite_url), "SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert "broker_message" in names and "kombu_message" not in names


def test_no_ack_get_deletes_on_delivery(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn:
        publish(conn, "gone once read")
        message = QUEUE(conn.channel()).get(no_ack=True)
        assert message is not None and message.payload == "gone once read"
        assert stored(sqlite_url) == 0


def test_no_ack_consumer_deletes_on_delivery(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn:
        publish(conn, 1, 2, 3)
        seen: list[object] = []
        with Consumer(conn, [QUEUE], no_ack=True, callbacks=[lambda body, _: seen.append(body)]):
            drain_until(conn, lambda: len(seen) >= 3)
        assert seen == [1, 2, 3]
        assert stored(sqlite_url) == 0


def test_a_commit_in_another_process_wakes_the_consumer_without_polling(sqlite_url: str) -> None:
    # Given a consumer whose fallback poll is 60 s away
    url = sqlite_url + "?polling_interval=60"
    with Connection(url) as conn:
        publish(conn, "prime")
        seen: list[object] = []
        with Consumer(conn, [QUEUE], callbacks=[lambda body, m: (seen.append(body), m.ack())]):
            conn.drain_events(timeout=5)
            assert seen == ["prime"]
            # When another process publishes while the consumer sleeps (the child's own
            # sleep is the scenario: the consumer is already waiting when the commit comes)
            script = (
                "import time, transports; from kombu import Connection, Exchange\n"
                "time.sleep(0.5)\n"
                f"with Connection({url!r}) as c:\n"
                "    print(time.time(), flush=True)\n"
                "    c.Producer().publish('woken', exchange=Exchange('tasks','direct'), routing_key='work')\n"
            )
            child = subprocess.Popen(
                [PYTHON, "-c", script], env=subprocess_env(), stdout=subprocess.PIPE, text=True
            )
            conn.drain_events(timeout=30)
            woken_at = time.time()
            publishing_at = float(child.communicate(timeout=30)[0])
    # Then it is woken by the commit, long before any poll could have found it
    assert seen == ["prime", "woken"]
    assert woken_at - publishing_at < WAKE_BOUND, woken_at - publishing_at


def test_a_message_no_binding_routes_is_dropped_without_a_write(sqlite_url: str) -> None:
    # Celery's task events while only gossip (worker.#) listens: a read, no write lock
    events = Exchange("celeryev", "topic")
    gossip = Queue("gossip", events, "worker.#")
    with Connection(sqlite_url) as conn:
        channel = conn.channel()
        gossip(channel).declare()
        observer = sqlite3.connect(db_path(sqlite_url))
        version = observer.execute("PRAGMA data_version").fetchone()
        producer = Producer(channel, exchange=events)
        assert not channel.routes("celeryev", "task.multi")
        producer.publish({"type": "task-succeeded"}, routing_key="task.multi")
        assert observer.execute("PRAGMA data_version").fetchone() == version
        assert channel.routes("celeryev", "worker.heartbeat")
        producer.publish({"type": "worker-heartbeat"}, routing_key="worker.heartbeat")
        assert query(db_path(sqlite_url), "SELECT queue FROM kombu_message") == [{"queue": "gossip"}]


def test_an_empty_claim_writes_nothing(sqlite_url: str) -> None:
    # Idle consumers must not wake each other: a claim that finds nothing commits nothing.
    store = Store(db_path(sqlite_url))
    observer = sqlite3.connect(db_path(sqlite_url))
    store.declare_queue("idle", message_ttl=None, expires=None, auto_delete=False)
    version = observer.execute("PRAGMA data_version").fetchone()
    assert store.claim(["idle"], owner="me", limit=5, lease=10) == []
    assert observer.execute("PRAGMA data_version").fetchone() == version


def test_acks_made_while_a_batch_is_delivered_are_one_write(sqlite_url: str) -> None:
    # Celery acks early, inside the delivery callback: eight acks cost one DELETE, not eight.
    with Connection(sqlite_url) as conn:
        for n in range(8):
            publish(conn, f"batched {n}")
        got: list[object] = []
        channel = conn.channel()
        with Consumer(channel, [QUEUE], callbacks=[lambda body, message: (got.append(body), message.ack())]):
            channel.basic_qos(0, 8, False)
            store = conn.transport.store
            before = store.local_writes
            drain_until(conn, lambda: len(got) >= 8)
            writes = store.local_writes - before
    assert len(got) == 8
    assert writes == 2, writes  # the claim of the batch and the DELETE of its acks
    assert stored(sqlite_url) == 0


def test_waiting_acks_go_in_the_next_claims_transaction(sqlite_url: str) -> None:
    # A prefork worker's acks (event-loop callbacks) and its next claim: one commit, not two.
    store = Store(db_path(sqlite_url))
    store.declare_queue("q", message_ttl=None, expires=None, auto_delete=False)
    for n in range(5):
        store.put("", "q", {"properties": {}, "body": n}, priority=0, expires_at=None)
    first = store.claim(["q"], owner="me", limit=3, lease=30)
    taken_by_other = store.claim(["q"], owner="other", limit=1, lease=30)
    before = store.local_writes
    acked, claimed = store.ack_and_claim(
        [m.row_id for m in first] + [taken_by_other[0].row_id], ["q"], owner="me", limit=5, lease=30
    )
    assert store.local_writes - before == 1
    assert acked == 3  # only our own rows: the other consumer's lease is untouched
    assert [m.payload["body"] for m in claimed] == [4]  # type: ignore[index]
    assert stored(sqlite_url) == 2


def held(url: str) -> int:
    return count(db_path(url), "SELECT count(*) FROM kombu_message WHERE lease_owner IS NOT NULL")


class UpkeepSwitch:
    """Wraps a channel's lease-keeper upkeep so that a test can stop it (made before the
    channel registers with the keeper, so every run of it goes through the switch)."""

    def __init__(self, channel: Channel) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._upkeep = channel.upkeep
        channel.upkeep = self._run

    def _run(self, now: float) -> None:
        with self._lock:
            if not self._stopped:
                self._upkeep(now)

    def stop(self) -> None:
        """Stop it; returns once a run under way has ended."""
        with self._lock:
            self._stopped = True


@contextlib.contextmanager
def holding_eight_of_twenty(url: str) -> Iterator[tuple[Connection, list[Message]]]:
    """A consumer with a prefetch of 8 holding 8 unacked messages of 20 (and the messages)."""
    with Connection(url) as conn:
        publish(conn, *(f"m{n}" for n in range(20)))
        got: list[Message] = []
        channel = conn.channel()
        upkeep = UpkeepSwitch(channel)
        with Consumer(channel, [QUEUE], callbacks=[lambda body, message: got.append(message)]):
            channel.basic_qos(0, 8, False)
            conn.drain_events(timeout=5)
            # The lease keeper's own upkeep (lease extension, queue touch) would blur write counts
            channel.connection.keeper.unregister(channel)
            upkeep.stop()
            assert (len(got), held(url)) == (8, 8)
            yield conn, got


def test_a_consumer_claims_once_half_its_prefetch_window_is_free(sqlite_url: str) -> None:
    # Given a consumer with a prefetch of 8 holding 8 unacked messages of 20
    with holding_eight_of_twenty(sqlite_url) as (conn, got):
        # When three are acked (five held): no claim for three slots
        for message in got[:3]:
            message.ack()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)
        assert (len(got), held(sqlite_url)) == (8, 5)
        # When a fourth is acked (half the window free): four more, in one claim
        got[3].ack()
        before = conn.transport.store.local_writes
        conn.drain_events(timeout=5)
        assert conn.transport.store.local_writes - before == 1
        assert (len(got), held(sqlite_url)) == (12, 8)


def test_event_loop_acks_go_with_the_next_claim_or_alone_after_ack_wait(sqlite_url: str) -> None:
    # Given a consumer run as in Celery's event loop (acks are deferred in its thread)
    with holding_eight_of_twenty(sqlite_url) as (conn, got):
        transport = conn.transport
        transport.loop_thread = threading.get_ident()
        store = transport.store
        # When two are acked and the loop ticks at once: they wait (no claim for two)
        for message in got[:2]:
            message.ack()
        transport._flush_acks()
        assert held(sqlite_url) == 8
        # Then, ACK_WAIT later, the next tick deletes them on their own
        time.sleep(ACK_WAIT)  # the scenario: the acks have waited their time
        transport._flush_acks()
        assert held(sqlite_url) == 6
        # When two more are acked (half the window free), the tick claims four more
        # with those acks in the claim's transaction: one write
        for message in got[2:4]:
            message.ack()
        before = store.local_writes
        transport._flush_acks()
        assert store.local_writes - before == 1
        assert (len(got), held(sqlite_url)) == (12, 8)
    assert stored(sqlite_url) == 16


def test_ack_from_another_thread(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn:
        publish(conn, "acked elsewhere")
        message = QUEUE(conn.channel()).get()
        assert message is not None
        worker = threading.Thread(target=message.ack)
        worker.start()
        worker.join()
    assert stored(sqlite_url) == 0


def test_connection_used_before_fork_works_in_the_child(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn:
        publish(conn, "from parent")
        pid = os.fork()
        if pid == 0:  # the child publishes through the inherited kombu connection
            code = 1  # what the child exits with unless the publish returns
            try:
                publish(conn, "from child")
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        bodies = drain_queue(QUEUE(conn.channel()))
    assert bodies == ["from parent", "from child"]


def test_options_from_query_string_and_transport_options(sqlite_url: str) -> None:
    conn = Connection(
        sqlite_url + "?visibility_timeout=12.5",
        transport_options={"polling_interval": 0.25, "claim_batch": 3},
    )
    transport = conn.transport
    assert isinstance(transport, Transport)
    assert transport.options == Options(visibility_timeout=12.5, polling_interval=0.25, claim_batch=3)
    assert transport.polling_interval == 0.25


def test_bad_option_is_named() -> None:
    with pytest.raises(ValueError, match=r"visibility_timeout='soon' must be a float"):
        Options.parse({"visibility_timeout": "soon"})
    with pytest.raises(ValueError, match=r"polling_interval=0 must be above 0"):
        Options.parse({"polling_interval": 0})


def test_sweep_removes_expired_messages_and_queues(sqlite_url: str) -> None:
    store = Store(db_path(sqlite_url))
    store.declare_queue("short", message_ttl=0.05, expires=None, auto_delete=False)
    store.declare_queue("departed", message_ttl=None, expires=0.05, auto_delete=False)
    store.bind("departed", "ex", "k")
    store.put("", "short", {"properties": {}}, priority=0, expires_at=None)
    store.put("", "departed", {"properties": {}}, priority=0, expires_at=None)
    time.sleep(0.2)  # the scenario: past the message TTL and the queue expiry (0.05 s)
    store.sweep(dead_letter_retention=3600)
    assert stored(sqlite_url) == 0
    assert query(db_path(sqlite_url), "SELECT name FROM kombu_queue") == [{"name": "short"}]
    assert count(db_path(sqlite_url), "SELECT count(*) FROM kombu_binding") == 0


def test_sweep_removes_auto_delete_queues_whose_last_consumer_died(sqlite_url: str) -> None:
    # Given two auto-delete queues whose consumer rows of a dead process ran out; one has a live one too
    store = Store(db_path(sqlite_url))
    for name in ("orphaned", "consumed"):
        store.declare_queue(name, message_ttl=None, expires=None, auto_delete=True)
        store.bind(name, "ex", name)
        store.add_consumer(name, "dead-process", "tag", ttl=0.05)
    store.add_consumer("consumed", "live-process", "tag", ttl=60)
    time.sleep(0.2)  # the scenario: past the dead process's consumer rows (0.05 s)
    # Then the dead consumers are not counted, and the sweep drops the queue nobody consumes
    assert (store.consumer_count("orphaned"), store.consumer_count("consumed")) == (0, 1)
    store.sweep(dead_letter_retention=3600)
    assert query(db_path(sqlite_url), "SELECT name FROM kombu_queue") == [{"name": "consumed"}]
    assert query(db_path(sqlite_url), "SELECT queue FROM kombu_binding") == [{"queue": "consumed"}]
    assert count(db_path(sqlite_url), "SELECT count(*) FROM kombu_consumer") == 1


def test_wal_stays_bounded_through_20000_messages(sqlite_url: str) -> None:
    # Given a publisher process writing 20,000 messages while we consume them
    script = (
        "import transports; from kombu import Connection, Exchange, Queue\n"
        f"with Connection({sqlite_url!r}) as c:\n"
        "    p = c.Producer(); q = Queue('work', Exchange('tasks','direct'), 'work')\n"
        "    for n in range(20000):\n"
        "        p.publish({'n': n, 'pad': 'x' * 200}, exchange=q.exchange, routing_key='work', declare=[q])\n"
    )
    with Connection(sqlite_url) as conn:
        QUEUE(conn.channel()).declare()
        child = subprocess.Popen([PYTHON, "-c", script], env=subprocess_env())
        wal = Path(f"{db_path(sqlite_url)}-wal")
        acked: list[int] = []
        largest = 0

        def on_message(body: dict[str, int], message: object) -> None:
            message.ack()  # type: ignore[attr-defined]
            acked.append(body["n"])

        def all_acked() -> bool:
            nonlocal largest
            largest = max(largest, wal.stat().st_size)
            return len(acked) >= 20000

        with Consumer(conn, [QUEUE], prefetch_count=50, callbacks=[on_message]):
            drain_until(conn, all_acked, timeout=240)
        child.wait(timeout=60)
    # Then every message went through once and the WAL never outgrew the bound
    assert sorted(acked) == list(range(20000))
    assert stored(sqlite_url) == 0
    print(f"largest -wal: {largest} bytes")
    assert largest < WAL_BOUND, f"-wal grew to {largest} bytes"
    assert not wal.exists() or wal.stat().st_size < WAL_BOUND  # SQLite removes it at the last close


def test_checkpoint_never_locks_the_api_out_while_a_reader_holds_a_snapshot(tmp_path: Path) -> None:
    # Given the API's media_store.db, one API request holding a read snapshot, and our broker
    # writing well past its WAL bound (a checkpoint is due every 50 writes)
    path = tmp_path / "media_store.db"
    make_api_database(path, "a")
    store = Store(path, wal_size_limit=64 * 1024, busy_timeout=3.0)  # 60 s in production
    store.declare_queue("work", message_ttl=None, expires=None, auto_delete=False)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM jobs").fetchall()
    # the API's writer: its own connection with SQLite's busy handler (2 s), inserting rows
    api = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def api_inserts() -> None:
        n = 0
        while not stop.is_set():
            row = api_schema.api_row(f"api-{n}", "image_resize", {"input_paths": []}, "a")
            began = time.monotonic()
            try:
                api_schema.insert_into(api, row)
            except sqlite3.OperationalError as exc:
                failures.append(str(exc))
            latencies.append(time.monotonic() - began)
            n += 1
            stop.wait(0.002)  # an API under load: ~500 inserts/s

    writer = threading.Thread(target=api_inserts)
    writer.start()
    try:
        # When the broker writes 200 messages (4 looks at the log's size) under the snapshot
        wal = Path(f"{path}-wal")
        for _ in range(200):
            store.put("", "work", {"properties": {}, "body": "x" * 2000}, priority=0, expires_at=None)
            time.sleep(0.001)  # a busy worker's pace (~1,000 writes/s), not a writer hogging the lock
        grown = wal.stat().st_size
    finally:
        stop.set()
        writer.join()
    # Then no API insert failed or waited long, though the log grew under the reader
    assert failures == []
    assert len(latencies) > 50, latencies
    assert max(latencies) < 1.0, f"an API insert waited {max(latencies):.2f} s"
    assert grown > 64 * 1024
    # And once the reader is done, the log returns under its bound at the next looks
    reader.execute("COMMIT")
    sizes = []
    for _ in range(50):  # the size is looked at every 50 writes
        store.put("", "work", {"properties": {}, "body": "x"}, priority=0, expires_at=None)
        sizes.append(wal.stat().st_size)
    assert min(sizes) <= 64 * 1024, f"-wal stayed at {min(sizes)} bytes"
    reader.close()
    api.close()


@pytest.mark.parametrize("compression", ["zlib", "bzip2", "lzma"])
def test_compressed_bodies_inflate_within_the_bound_and_a_bomb_is_dead_lettered(
    sqlite_url: str, compression: str
) -> None:
    # Given a 1 MiB bound, a compressed message under it, one that inflates past it, one more
    options = {"max_inflated_bytes": 1024 * 1024}
    with Connection(sqlite_url, transport_options=options) as conn:
        publish(conn, "a" * 1000, compression=compression)
        publish(conn, "b" * (2 * 1024 * 1024), compression=compression)
        publish(conn, {"after": "bomb"}, compression=compression)
        # When a consumer drains the queue
        bodies = drain_queue(QUEUE(conn.channel()))
    # Then the two within the bound arrive, the bomb is a dead letter naming the bound
    assert bodies == ["a" * 1000, {"after": "bomb"}]
    dead = query(db_path(sqlite_url), "SELECT reason FROM kombu_dead_letter")
    assert len(dead) == 1
    assert "inflates past max_inflated_bytes=1048576" in str(dead[0]["reason"])
    assert stored(sqlite_url) == 0


def test_a_compression_without_a_bounded_decoder_is_dead_lettered(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn:
        Producer(conn.channel()).publish(
            b"\x00" * 10,
            exchange=EXCHANGE,
            routing_key="work",
            declare=[QUEUE],
            content_type="application/data",
            headers={"compression": "application/x-brotli"},
        )
        assert drain_queue(QUEUE(conn.channel())) == []
    dead = query(db_path(sqlite_url), "SELECT reason FROM kombu_dead_letter")
    assert "compression 'application/x-brotli' cannot be inflated with a bound" in str(dead[0]["reason"])


def test_a_property_that_is_not_json_is_dropped_with_one_warning(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given messages published with a property that is a Python object (Celery's suite passes
    # its Signal) beside one that is JSON
    with Connection(sqlite_url) as conn:
        with caplog.at_level("WARNING", logger="transports.sqlite"):
            publish(conn, "first", dispatcher=Signal(name="test"), x_custom="kept")
            publish(conn, "second", dispatcher=Signal(name="test"))
        # Then both publishes succeed; the object is dropped (as AMQP drops properties it
        # does not define), the JSON property stays, and one warning names the property
        bound = QUEUE(conn.channel())
        received = [bound.get(), bound.get()]
    assert [message.payload for message in received if message] == ["first", "second"]
    first = received[0]
    assert first is not None and "dispatcher" not in first.properties
    assert first.properties["x_custom"] == "kept"
    warnings = [record.getMessage() for record in caplog.records if "'dispatcher'" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert "Signal" in warnings[0] and "dropped" in warnings[0]


def test_a_header_that_is_not_json_is_refused_to_the_publisher(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn, pytest.raises(TypeError, match=r"header 'callback' is a Signal"):
        publish(conn, "refused", headers={"callback": Signal(name="test"), "fine": 1})
    assert stored(sqlite_url) == 0


def test_queues_of_one_consumer_merge_by_priority_then_publish_order(sqlite_url: str) -> None:
    # Given one consumer of two queues, and messages of several priorities in both
    exchange = Exchange("merge", "direct")
    queues = [Queue("low", exchange, "low"), Queue("high", exchange, "high")]
    with Connection(sqlite_url) as conn:
        received: list[object] = []
        with conn.Consumer(queues, callbacks=[lambda body, msg: (received.append(body), msg.ack())]):
            producer = Producer(conn.channel())
            sent = [("low", "a", 0), ("high", "b", 0), ("low", "c", 5), ("high", "d", 9), ("low", "e", 0)]
            for key, body, priority in sent:
                producer.publish(body, exchange=exchange, routing_key=key, priority=priority)
            drain_until(conn, lambda: len(received) >= len(sent))
    # Then they come as from one queue: higher priority first, publish order within one
    assert received == ["d", "c", "a", "b", "e"]
