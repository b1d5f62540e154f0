"""Issue 14.7: the limits of a job, and of a compressed broker message, on the API's era-A table.

* ``JOB_TIME_LIMIT``: a FIFO as input (nobody writes to it) blocks its runner's ``open``
  forever; the job ends ``error`` naming the limit, is not retried, and the pool slot
  serves the next job (one pool process: the control job runs in the freed slot).
* ``JOB_MAX_PAIRS``, ``JOB_MAX_OUTPUT_PIXELS``: refused before any work, naming the limit.
* A compression bomb (a few KB of bz2, 3 MB of zlib, each 3 GiB inflated) is dead-lettered
  by the worker's SQLite consumer, which stays alive with a small peak RSS (and runs under
  an address-space limit, so a regression fails the test instead of the machine), and a
  normal job after it is delivered. On Redis (kombu's own transport inflates) the worker's
  bounded decoders refuse it in one line.
"""

from __future__ import annotations

import bz2
import functools
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from PIL import Image

from cl_tasks import settings
from cl_tasks.settings import SettingsError
from tests import support
from tests.support import StartWorker, Worker, insert_job, job_row, wait_for_job
from transports.compression import DEFAULT_MAX_INFLATED_BYTES

ERA = "a"
#: What the bombs inflate to (3 GiB).
BOMB_BYTES = 3 * 1024**3
#: Bytes inflated at a time while counting a bomb's size.
WINDOW = 1 << 26
#: The address space a bomb-test worker process may use: far below a bomb, far above a worker.
WORKER_ADDRESS_SPACE = 2 * 1024**3
#: Peak RSS growth of the worker's main process while it refuses the bombs, at most.
RSS_GROWTH_BOUND = DEFAULT_MAX_INFLATED_BYTES + 64 * 1024**2


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A CL_SERVER_DIR with the API's era-A media_store.db and a small ``good.png``."""
    folder = tmp_path / "data"
    folder.mkdir()
    support.make_api_database(folder / "media_store.db", ERA)
    Image.new("RGB", (30, 20), (10, 200, 10)).save(folder / "good.png")
    return folder


def run(data: Path, job_id: str, task_type: str, params: object, timeout: float = 120) -> dict[str, object]:
    """INSERT an era-A row as the API does; wait until it ends; return it."""
    insert_job(data / "media_store.db", job_id, task_type, params, era=ERA)
    return wait_for_job(data / "media_store.db", job_id, timeout)


def resize(inputs: list[str], **params: object) -> dict[str, object]:
    outputs = [f"out/{index}.png" for index in range(len(inputs))]
    return {"input_paths": inputs, "output_paths": outputs, "width": 10, "height": 10, **params}


# -- JOB_TIME_LIMIT ------------------------------------------------------------------


@pytest.fixture
def fifo_worker(data: Path, start_worker: StartWorker) -> Worker:
    """One pool process, a 3 s JOB_TIME_LIMIT, runners unconfined (they open the job's paths)."""
    env = support.compute_env(data, JOB_TIME_LIMIT="3", RUNNER_CONFINEMENT="off")
    return start_worker(env, "-Q", "image_resize", "-c", "1")


def test_a_fifo_input_ends_error_at_the_time_limit_and_frees_the_slot(
    data: Path, fifo_worker: Worker
) -> None:
    # Given an input that is a FIFO nobody writes to (its open blocks forever)
    os.mkfifo(data / "stuck.png")
    # When the API queues a job on it, then a good job, for a worker with one pool slot
    row = run(data, "fifo-job", "image_resize", resize(["stuck.png"]), timeout=60)
    control = run(data, "after-fifo", "image_resize", resize(["good.png"]), timeout=60)
    # Then the FIFO job ends error naming the limit and the setting, tried once
    assert row["status"] == "error", row
    assert str(row["error_message"]).startswith(
        "stopped: the job exceeded JOB_TIME_LIMIT=3 s and its runner was killed;"
    ), row
    assert "raise JOB_TIME_LIMIT" in str(row["error_message"])
    assert row["retry_count"] == 0
    # and the slot it held ran the next job
    assert control["status"] == "completed", control
    assert "retrying" not in fifo_worker.text()


def test_a_confined_runner_that_never_answers_ends_error_at_the_time_limit(
    data: Path, start_worker: StartWorker
) -> None:
    # Given a worker with confined runners (bubblewrap here), one pool slot, a 3 s limit
    env = support.compute_env(data, JOB_TIME_LIMIT="3")
    worker = start_worker(env, "-Q", "misbehave,image_resize", "-c", "1")
    # When a job's runner hangs, then a FIFO is given as input, then a good job comes
    hung = run(data, "hangs", "misbehave", {"mode": "hang", "pid_path": "hang.pid"}, timeout=60)
    os.mkfifo(data / "stuck.png")
    fifo = run(data, "fifo-confined", "image_resize", resize(["stuck.png"]), timeout=60)
    control = run(data, "after-hang", "image_resize", resize(["good.png"]), timeout=60)
    # Then the hanging one ends error at the limit, not retried
    assert hung["status"] == "error", hung
    assert str(hung["error_message"]).startswith("stopped: the job exceeded JOB_TIME_LIMIT=3 s"), hung
    assert hung["retry_count"] == 0
    # the FIFO is refused by the worker before the runner sees it (staging opens without blocking)
    assert fifo["error_message"] == (
        f"parameter input_paths[0] 'stuck.png': {data / 'stuck.png'} is not a regular file; name a file"
    )
    # and the slot serves the next job
    assert control["status"] == "completed", control
    assert worker.process.poll() is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("JOB_TIME_LIMIT", "0", "JOB_TIME_LIMIT='0' must be above 0"),
        ("JOB_TIME_LIMIT", "soon", "JOB_TIME_LIMIT='soon' must be a number of seconds above 0"),
        ("JOB_MAX_PAIRS", "1.5", "JOB_MAX_PAIRS='1.5' must be a whole number above 0"),
        ("JOB_MAX_OUTPUT_PIXELS", "-1", "JOB_MAX_OUTPUT_PIXELS='-1' must be above 0"),
    ],
)
def test_a_bad_limit_is_refused_in_one_line(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        settings.load({variable: value})
    assert str(refused.value) == message


def test_the_default_limits() -> None:
    limits = settings.load({}).limits
    assert (limits.time_limit, limits.max_pairs, limits.max_output_pixels) == (1800, 1000, 100_000_000)
    assert limits.hard_time_limit == 1830


# -- JOB_MAX_PAIRS, JOB_MAX_OUTPUT_PIXELS ---------------------------------------------------


@pytest.fixture
def small_limits_worker(data: Path, start_worker: StartWorker) -> Worker:
    env = support.compute_env(data, JOB_MAX_PAIRS="3", JOB_MAX_OUTPUT_PIXELS="1000000")
    return start_worker(env, "-Q", "image_resize", "-c", "1")


def test_too_many_pairs_are_refused_before_any_work(data: Path, small_limits_worker: Worker) -> None:
    # Given a job of four input/output pairs and JOB_MAX_PAIRS=3
    row = run(data, "many-pairs", "image_resize", resize(["good.png"] * 4))
    # Then it ends error naming the limit, and no output was written
    assert row["status"] == "error", row
    assert row["error_message"] == (
        "parameter input_paths has 4 paths, more than JOB_MAX_PAIRS=3 input/output pairs per job;"
        " split it into several jobs (or raise JOB_MAX_PAIRS)"
    )
    assert not (data / "out").exists()
    # while a job of three pairs runs
    assert run(data, "three-pairs", "image_resize", resize(["good.png"] * 3))["status"] == "completed"


def test_an_output_past_the_pixel_limit_is_refused_before_any_work(
    data: Path, small_limits_worker: Worker
) -> None:
    # Given a resize to 1001 x 1000 pixels and JOB_MAX_OUTPUT_PIXELS=1000000
    row = run(data, "big-output", "image_resize", resize(["good.png"], width=1001, height=1000))
    # Then it ends error naming the limit, and no output was written
    assert row["status"] == "error", row
    assert row["error_message"] == (
        "an output of 1001 x 1000 = 1001000 pixels is more than JOB_MAX_OUTPUT_PIXELS=1000000;"
        " ask for a smaller size (or raise JOB_MAX_OUTPUT_PIXELS)"
    )
    assert not (data / "out").exists()
    # while 1000 x 1000 runs
    params = resize(["good.png"], width=1000, height=1000)
    assert run(data, "at-the-limit", "image_resize", params)["status"] == "completed"


# -- compression bombs ---------------------------------------------------------------------


@functools.cache
def bz2_bomb(size: int = BOMB_BYTES) -> bytes:
    """bz2 of ``size`` zero bytes as concatenated streams (bz2.decompress reads them all): ~3 KB."""
    streams = 30
    return bz2.compress(bytes(size // streams)) * streams


@functools.cache
def zlib_bomb(size: int = BOMB_BYTES) -> bytes:
    """zlib of ``size`` zero bytes (~3 MB), made without compressing 3 GiB.

    After a full flush deflate starts over, so every MiB of zeros compresses to the
    same bytes: one MiB is compressed and its bytes repeated, and the trailer carries
    the checksum of all of it.
    """
    chunk = bytes(1 << 20)
    deflate = zlib.compressobj(9)
    head = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    middle = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.flush()[:-4]
    checksum = 1
    for _ in range(size // len(chunk)):
        checksum = zlib.adler32(chunk, checksum)
    return head + middle * (size // len(chunk) - 1) + tail + struct.pack(">I", checksum)


def inflated_size(body: bytes, codec: str) -> int:
    """How many bytes ``body`` inflates to, counted a window at a time (never held at once)."""
    total, data = 0, body
    while data:
        inflater: Any = bz2.BZ2Decompressor() if codec == "bz2" else zlib.decompressobj()
        total += len(inflater.decompress(data, WINDOW))
        while not inflater.eof:
            total += len(inflater.decompress(getattr(inflater, "unconsumed_tail", b""), WINDOW))
        data = inflater.unused_data if codec == "bz2" else b""
    return total


def test_the_bombs_inflate_to_3_gib() -> None:
    # (what the worker test relies on)
    assert inflated_size(bz2_bomb(), "bz2") >= BOMB_BYTES - WINDOW
    assert inflated_size(zlib_bomb(), "zlib") >= BOMB_BYTES - WINDOW
    assert len(bz2_bomb()) < 4096


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid``: its peak resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _limited_worker(data: Path, name: str, **env: str) -> Iterator[Worker]:
    """A ledger_echo worker named ``name`` whose every process may use at most WORKER_ADDRESS_SPACE."""
    prefix = ("prlimit", f"--as={WORKER_ADDRESS_SPACE}", "--")
    log = data.parent / f"{name}-worker.log"
    worker = Worker(
        support.compute_env(data, MALLOC_ARENA_MAX="2", **env),
        log,
        *("-n", f"{name}@%h", "-Q", "ledger_echo", "-c", "1"),
        prefix=prefix,
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def bomb_worker(data: Path) -> Iterator[Worker]:
    """A ledger_echo worker on the SQLite broker, under WORKER_ADDRESS_SPACE."""
    yield from _limited_worker(data, "bomb")


@pytest.mark.parametrize(
    ("compression", "bomb", "codec"),
    [("application/x-bz2", bz2_bomb, "bz2"), ("application/x-gzip", zlib_bomb, "zlib")],
)
def test_a_compression_bomb_is_dead_lettered_and_the_worker_serves_on(
    data: Path, bomb_worker: Worker, compression: str, bomb: Callable[[], bytes], codec: str
) -> None:
    database = data / "media_store.db"
    body = bomb()
    assert run(data, "before-bomb", "ledger_echo", {"ledger_path": "ledger.txt"})["status"] == "completed"
    before = peak_rss(bomb_worker.process.pid)
    # When a message whose body inflates to 3 GiB reaches the worker's queue
    support.publish_raw(
        database, body, {"compression": compression, "marker": "the-bomb"}, "application/json"
    )
    # Then it is dead-lettered unread, naming the bound, in one log line
    reason = support.wait_dead_letter(database, "the-bomb", timeout=60)
    assert reason == (
        f"refused unread: its {codec} body ({len(body)} bytes) inflates past"
        f" max_inflated_bytes={DEFAULT_MAX_INFLATED_BYTES} (a compression bomb?) and was not inflated"
        " further; if bodies this large are expected, raise the broker transport option max_inflated_bytes"
    )
    assert bomb_worker.text().count("moved to dead letters: refused unread") == 1
    # and the worker lives, its memory barely grew, and the next job runs
    assert run(data, "after-bomb", "ledger_echo", {"ledger_path": "ledger.txt"})["status"] == "completed"
    assert bomb_worker.process.poll() is None
    assert peak_rss(bomb_worker.process.pid) - before < RSS_GROWTH_BOUND
    assert job_row(database, "after-bomb")["retry_count"] == 0


#: A Redis database of its own, so no other test's worker sees this test's queues.
REDIS_BROKER = f"{support.REDIS_URL}/11"


@pytest.fixture
def redis_bomb_worker(data: Path) -> Iterator[Worker]:
    """A ledger_echo worker on Redis (jobs in SQLite), under WORKER_ADDRESS_SPACE."""
    assert support.port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379"
    with Connection(REDIS_BROKER) as conn:
        conn.default_channel.client.flushdb()
    yield from _limited_worker(data, "redis-bomb", CELERY_BROKER_URL=REDIS_BROKER)


def test_a_compression_bomb_on_redis_is_refused_in_one_line(data: Path, redis_bomb_worker: Worker) -> None:
    # (another broker: kombu's own transport inflates, through the worker's bounded decoders)
    body = bz2_bomb()
    assert run(data, "before-redis-bomb", "ledger_echo", {"ledger_path": "l.txt"})["status"] == "completed"
    before = peak_rss(redis_bomb_worker.process.pid)
    # When a bz2 body that inflates to 3 GiB reaches the worker's queue
    with Connection(REDIS_BROKER) as conn:
        conn.Producer().publish(
            body,
            routing_key="ledger_echo",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"compression": "application/x-bz2"},
        )
    # Then it is refused in one line naming the bound
    refused = (
        f"refused unread: its bz2 body ({len(body)} bytes) inflates past"
        f" max_inflated_bytes={DEFAULT_MAX_INFLATED_BYTES}"
    )
    redis_bomb_worker.wait_for_log(refused, timeout=60)
    assert redis_bomb_worker.text().count(refused) == 1
    # and the worker lives, its memory barely grew, and the next job runs
    assert run(data, "after-redis-bomb", "ledger_echo", {"ledger_path": "l.txt"})["status"] == "completed"
    assert redis_bomb_worker.process.poll() is None
    assert peak_rss(redis_bomb_worker.process.pid) - before < RSS_GROWTH_BOUND
