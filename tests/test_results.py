"""Our result backend (``cl_tasks.results``) gives groups and chords what Celery's Redis backend does.

Every test runs on the SQLite default and on PostgreSQL (``DATABASE_URL``), with a real
prefork worker of ``apps.canvas_tasks`` on our SQLite broker. Celery's own integration
suite skips 101 tests unless the result backend is Redis (they read Redis as a side
channel); the areas those cover have a representative here (docs/celery-suite.md):
native joins and their timeout, groups and their callbacks/errbacks, chords (no
``chord_unlock`` polling, header failure, errbacks, chords of chords, chains of
chords, ``add_to_chord``, a header task replaced by a chain, a re-applied frozen
chord, a duplicated header part counted once), and the atomic counter.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from apps import canvas_tasks
from celery import chain, chord, group, signals
from celery.app.task import Context
from celery.exceptions import ChordError
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult, ResultSet

from cl_tasks import jobs, settings
from tests.support import (
    PYTHON,
    Worker,
    broker_left,
    drop_postgresql_database,
    make_api_database,
    make_api_postgresql_database,
    subprocess_env,
    wait_until,
)

TIMEOUT = 30


@dataclass(frozen=True)
class Stack:
    """A worker of ``apps.canvas_tasks`` and what the test process needs to be its client."""

    env: dict[str, str]
    broker_db: Path
    ledger: Path
    worker: Worker


@pytest.fixture(scope="module")
def broker_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite broker (and the SQLite stack's result database), the API's ``media_store.db``.

    Both stacks share it: the test process's Celery app keeps its producer pool for its life.
    """
    data = tmp_path_factory.mktemp("results") / "data"
    data.mkdir()
    make_api_database(data / "media_store.db")
    return data / "media_store.db"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, broker_db: Path
) -> Iterator[Stack]:
    """The worker, and this process's settings pointing at the same result database."""
    tmp = tmp_path_factory.mktemp(f"results-{request.param}")
    env = {
        "TEST_BROKER_URL": f"sqlite:///{broker_db}",
        "CELERY_BROKER_URL": f"sqlite:///{broker_db}",
        "CL_SERVER_DIR": str(broker_db.parent),
        "TEST_LEDGER": str(tmp),
        "BROADCAST_TYPE": "noop",
    }
    name = f"clresults_{uuid.uuid4().hex[:12]}"
    if request.param == "postgresql":
        env["DATABASE_URL"] = make_api_postgresql_database(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DATABASE_URL", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        _forget_settings()
        worker_env = subprocess_env(**env)
        worker = Worker(worker_env, tmp / "worker.log", "-P", "prefork", "-c", "2", app="apps.canvas_tasks")
        worker.wait_ready(timeout=120)
        try:
            yield Stack(worker_env, broker_db, tmp / "ledger", worker)
        finally:
            worker.stop()
            _forget_settings()
    if request.param == "postgresql":
        drop_postgresql_database(name)


def _forget_settings() -> None:
    """This process reads the environment again (settings and the jobs engine are per process)."""
    settings.current.cache_clear()
    jobs.job_store.cache_clear()


@pytest.fixture
def tasks(stack: Stack) -> Any:
    """The ``apps.canvas_tasks`` module, the client side of the worker."""
    canvas_tasks.app.conf.broker_url = stack.env["TEST_BROKER_URL"]
    canvas_tasks.app.backend._cache.clear()
    return canvas_tasks


def ledger(stack: Stack) -> list[str]:
    return stack.ledger.read_text().split() if stack.ledger.exists() else []


# -- the key/value store ---------------------------------------------------------------------


def test_mget_get_many_and_join_native(tasks: Any) -> None:
    # Given five results and one id nothing will ever write
    sent = [tasks.add.delay(n, n) for n in range(5)]
    assert ResultSet(sent).join_native(timeout=TIMEOUT) == [0, 2, 4, 6, 8]
    backend = tasks.app.backend
    # When they are read in one query, Then in the order asked, a missing key as None
    keys = [backend.get_key_for_task(each.id) for each in sent] + [backend.get_key_for_task("missing")]
    values = backend.mget(keys)
    assert [backend.decode_result(value)["result"] for value in values[:5]] == [0, 2, 4, 6, 8]
    assert values[5] is None
    got = dict(backend.get_many([each.id for each in sent], timeout=TIMEOUT))
    assert {task_id: meta["result"] for task_id, meta in got.items()} == {
        each.id: 2 * n for n, each in enumerate(sent)
    }
    states = {meta["status"] for _, meta in ResultSet(sent).iter_native(timeout=TIMEOUT)}
    assert states == {"SUCCESS"}


def test_join_native_gives_up_at_its_timeout(tasks: Any) -> None:
    never = ResultSet([AsyncResult(str(uuid.uuid4()), app=tasks.app) for _ in range(3)])
    started = time.monotonic()
    with pytest.raises(ResultTimeout):
        never.join_native(timeout=0.5, interval=30)
    assert time.monotonic() - started < 5


def test_counter_is_atomic_under_two_processes(stack: Stack) -> None:
    # Given two processes incrementing one key 200 times each, at the same moment
    key = f"counter-{uuid.uuid4().hex}"
    script = (
        "from apps.canvas_tasks import app\n"
        f"print(' '.join(str(app.backend.incr({key!r})) for _ in range(200)))\n"
    )
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", script],
            env=stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    # Then every increment returned its own count: 1..400, none lost, none twice
    counts = [int(n) for out, _ in outputs for n in out.split()]
    assert sorted(counts) == list(range(1, 401))


# -- groups ----------------------------------------------------------------------------------


def test_group_and_nested_group(tasks: Any) -> None:
    assert group(tasks.add.s(n, n) for n in range(20))().get(timeout=TIMEOUT) == [2 * n for n in range(20)]
    nested = group(tasks.add.s(1, 1), group(tasks.add.s(2, 2), tasks.add.s(3, 3)))
    assert nested().get(timeout=TIMEOUT) == [2, 4, 6]  # Celery flattens a group in a group


def test_group_callback_and_errback(tasks: Any, stack: Stack) -> None:
    # Given a group with a callback, and one with a failing member and an errback
    ok, bad = f"ok-{uuid.uuid4().hex[:6]}", f"bad-{uuid.uuid4().hex[:6]}"
    good = group(tasks.add.s(1, 1), tasks.add.s(2, 2))
    good.link(tasks.record.si(key=ok))
    failing = group(tasks.add.s(1, 1), tasks.fail.s())
    failing.link_error(tasks.record.si(key=bad))
    assert good().get(timeout=TIMEOUT) == [2, 4]
    with pytest.raises(tasks.ExpectedError):
        failing().get(timeout=TIMEOUT)
    # Then the callback ran for the good one, the errback for the failed one
    wait_until(lambda: {ok, bad} <= set(ledger(stack)), TIMEOUT, "the callback and the errback ran")


# -- chords ----------------------------------------------------------------------------------


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Names of the tasks this process publishes."""
    names: list[str] = []

    def note(sender: str | None = None, **_: Any) -> None:
        names.append(str(sender))

    signals.before_task_publish.connect(note, weak=False)
    yield names
    signals.before_task_publish.disconnect(note)


def test_chord_body_is_sent_by_the_last_header_part_without_chord_unlock(
    tasks: Any, published: list[str]
) -> None:
    # Given a chord of 10 header tasks
    result = chord(tasks.add.s(n, n) for n in range(10))(tasks.tsum.s())
    # When it completes, Then the body has the header's results
    assert result.get(timeout=TIMEOUT) == 90
    # And no chord_unlock task was sent (it polls every second)
    assert "celery.chord_unlock" not in published
    assert published.count("apps.canvas_tasks.add") == 10
    # And the body was done sooner after the last header part than chord_unlock's first look (1 s)
    header_done = max(AsyncResult(each.id, app=tasks.app).date_done for each in result.parent.results)
    assert (result.date_done - header_done).total_seconds() < 1.0


def test_failed_header_fails_the_chord_at_once(tasks: Any) -> None:
    # Given a chord whose header has a failing task
    result = chord([tasks.add.s(1, 1), tasks.fail.s()])(tasks.tsum.s())
    # When a join on the chord's own result raises (AsyncResult.get raises the header's
    # error as soon as that task failed, before the chord was told: as on Redis)
    with pytest.raises((ChordError, tasks.ExpectedError)):
        ResultSet([result]).get(timeout=TIMEOUT)
    # Then the chord is FAILURE at that moment (not PENDING until chord_unlock's next look)
    assert result.state == "FAILURE"
    # And a chain of chords after a failed one fails too (Celery's suite asks it of Redis)
    inner = chain(
        chord([tasks.add.s(1, 1), tasks.fail.s()], tasks.tsum.s()), chord([tasks.add.s(1)], tasks.tsum.s())
    )
    outer = group(inner, tasks.add.s(1, 1))()
    with pytest.raises((ChordError, tasks.ExpectedError)):
        outer.get(timeout=TIMEOUT)
    assert outer.results[0].state == "FAILURE"


def test_chord_errback_runs_when_the_header_fails(tasks: Any, stack: Stack) -> None:
    key = f"chord-errback-{uuid.uuid4().hex[:6]}"
    failing = chord([tasks.add.si(1, 1), tasks.fail.si()], tasks.tsum.s())
    failing.link_error(tasks.record.si(key=key))
    with pytest.raises((ChordError, tasks.ExpectedError)):
        failing().get(timeout=TIMEOUT)
    wait_until(lambda: key in ledger(stack), TIMEOUT, "the chord's errback ran")


def test_chord_of_chords_and_chain_of_chords(tasks: Any) -> None:
    inner = [chord([tasks.add.s(n, n), tasks.add.s(n, 1)], tasks.tsum.s()) for n in range(3)]
    assert chord(inner)(tasks.tsum.s()).get(timeout=TIMEOUT) == sum(3 * n + 1 for n in range(3))
    chained = chain(
        chord([tasks.add.s(1, 1), tasks.add.s(2, 2)], tasks.tsum.s()),
        chord([tasks.add.s(10), tasks.add.s(20)], tasks.tsum.s()),
    )
    assert chained().get(timeout=TIMEOUT) == (6 + 10) + (6 + 20)
    # A header holding a group keeps its shape in the body's argument
    ending_in_group = chain(tasks.add.si(2, 2), group(tasks.add.si(3, 3), tasks.add.si(4, 4)))
    shaped = chord([tasks.add.si(1, 1), ending_in_group], tasks.identity.s())
    assert shaped().get(timeout=TIMEOUT) == [2, [6, 8]]


def test_add_to_chord_and_a_header_task_replaced_by_a_chain(tasks: Any) -> None:
    grown = chord([tasks.add_to_own_chord.s(1, 100), tasks.add.s(2, 2)], tasks.tsum.s())
    assert grown().get(timeout=TIMEOUT) == 1 + 4 + 100
    replaced = chord([tasks.replace_with_chain.s(1), tasks.add.s(2, 2)], tasks.tsum.s())
    assert replaced().get(timeout=TIMEOUT) == (1 + 1 + 10) + 4


def test_reapplying_a_frozen_chord_sends_the_body_again(tasks: Any) -> None:
    frozen = chord([tasks.add.si(1, 1), tasks.add.si(2, 2)], tasks.tsum.s())
    first = frozen.freeze()
    assert frozen.apply_async().get(timeout=TIMEOUT) == 6
    AsyncResult(first.id, app=tasks.app).forget()
    again = frozen.apply_async()
    assert again.id == first.id
    assert again.get(timeout=TIMEOUT) == 6


def test_a_duplicated_header_part_is_counted_once(tasks: Any, stack: Stack) -> None:
    # Given a chord of two header parts (nobody runs them: the body stays in the broker)
    group_id = str(uuid.uuid4())
    queue = f"nobody-consumes-{uuid.uuid4().hex[:8]}"
    body = tasks.tsum.s().set(queue=queue)
    header = [
        tasks.add.si(1, 1).set(group_id=group_id, group_index=0),
        tasks.add.si(2, 2).set(group_id=group_id, group_index=1),
    ]
    backend = tasks.app.backend
    backend.set_chord_size(group_id, 2)
    requests = [_part_request(sig, group_id, index, body) for index, sig in enumerate(header)]
    # When the first part returns twice (an acks_late redelivery) and then the second once
    backend.mark_as_done(requests[0].id, 2, request=requests[0])
    backend.mark_as_done(requests[0].id, 2, request=requests[0])
    assert broker_left(stack.broker_db, queue) == 0
    backend.mark_as_done(requests[1].id, 4, request=requests[1])
    # Then the body was sent once, after the second part, with both results in header order
    assert broker_left(stack.broker_db, queue) == 1
    # And a late copy of a part after the body was sent sends nothing more
    backend.mark_as_done(requests[1].id, 4, request=requests[1])
    assert broker_left(stack.broker_db, queue) == 1


def _part_request(sig: Any, group_id: str, index: int, body: Any) -> Any:
    """The request of a chord header task as the worker's tracer passes it to the backend."""
    return Context(id=str(uuid.uuid4()), group=group_id, group_index=index, chord=dict(body), task=sig.task)
