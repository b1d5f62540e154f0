"""Generated bad input: whatever params, image bytes or broker messages arrive, a job ends
``completed`` or ``error`` with a clear message, a message is dead-lettered, never run,
and the worker keeps serving.

One worker (prefork, 2 processes) serves every test of this module. Hypothesis runs a
fixed set of examples (``derandomize=True``, no example database), so CI sees the same
cases on every run; ``max_examples`` keeps the module within about a minute.
"""

from __future__ import annotations

import io
import itertools
import json
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests import support
from tests.support import Worker, count, job_row, publish_raw, run_client, wait_dead_letter, wait_until

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TASK_TYPES = ("image_resize", "image_conversion", "ledger_echo", "misbehave")
#: misbehave modes that hang, sleep or crash on purpose: never drawn at random.
MISBEHAVE_MODES = frozenset({"garbage", "crash", "hang", "env", "write_other_venv"})
#: Keys that would make ledger_echo loop or sleep for as long as they say.
UNBOUNDED_KEYS = frozenset({"steps", "seconds", "mode"})
_serial = itertools.count()


# -- the worker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = support.make_server_dir(tmp_path_factory.mktemp("fuzz"))
    (folder / "images").mkdir()
    return folder


@pytest.fixture(scope="module")
def env(data: Path) -> dict[str, str]:
    return support.compute_env(data, BROADCAST_TYPE="noop")


@pytest.fixture(scope="module")
def worker(data: Path, env: dict[str, str]) -> Iterator[Worker]:
    process = Worker(env, data.parent / "worker.log", "-n", "fuzz@%h", "-c", "2", "-Q", ",".join(TASK_TYPES))
    process.wait_ready()
    yield process
    process.stop()


def jobs(data: Path) -> Path:
    return data / "media_store.db"


def run_row(data: Path, task_type: str, params_text: str, timeout: float = 60.0) -> dict[str, Any]:
    """INSERT a queued row as the API service does; wait until it ends; return it."""
    return support.run_job(
        jobs(data), f"fuzz-{next(_serial)}-{uuid.uuid4().hex[:6]}", task_type, params_text, timeout
    )


def assert_clear(message: object) -> None:
    """An error message a user can act on: text, not empty, not a bare traceback or a worker bug."""
    assert isinstance(message, str) and message.strip(), message
    assert not message.startswith("Traceback"), message
    assert "internal error in the worker" not in message, message


def assert_ended_cleanly(row: dict[str, Any]) -> None:
    assert row["status"] in ("completed", "error"), row
    assert row["completed_at"] is not None, row
    if row["status"] == "error":
        assert_clear(row["error_message"])
    else:
        json.loads(row["task_output"])


# -- 1. random params ----------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
MISSING = object()


def not_a_number(value: Any) -> bool:
    """True unless ``int()``/``float()`` would turn ``value`` into a (maybe huge) number."""
    if isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except (TypeError, ValueError, OverflowError):
        return True
    return False


def keys_with(values: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """The right keys, each missing, well-typed or anything at all."""
    drawn = st.fixed_dictionaries({key: st.just(MISSING) | strategy for key, strategy in values.items()})
    return drawn.map(lambda params: {key: value for key, value in params.items() if value is not MISSING})


small_side = st.integers(1, 64)
bad_side = st.integers().filter(lambda n: not 1 <= n <= 20000) | json_values.filter(
    lambda value: not isinstance(value, int)
)
path_lists = st.lists(st.text(max_size=12), max_size=3)
WELL_FORMED: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "image_resize": {
        "input_paths": st.just(["good.png"]) | path_lists | json_values,
        "output_paths": st.just(["out/fuzz.png"]) | path_lists | json_values,
        "width": small_side | bad_side,
        "height": small_side | bad_side,
        "maintain_aspect_ratio": st.booleans() | json_values,
    },
    "image_conversion": {
        "input_paths": st.just(["good.png"]) | path_lists | json_values,
        "output_paths": st.sampled_from([["out/fuzz.jpg"], ["out/fuzz.webp"]]) | path_lists | json_values,
        "format": st.sampled_from(["png", "JPG", "webp", "gif", "bmp", "tiff", "xcf"]) | json_values,
        "quality": st.integers(1, 100) | st.integers() | json_values,
    },
    "ledger_echo": {
        "ledger_path": st.just("fuzz-ledger.txt") | json_values,
        "steps": st.integers(1, 3) | json_values.filter(not_a_number),
        "seconds": st.just(0) | json_values.filter(not_a_number),
        "echo": json_values,
    },
    "misbehave": {
        "mode": json_values.filter(lambda mode: not isinstance(mode, str) or mode not in MISBEHAVE_MODES),
        "pid_path": json_values,
    },
}
#: Keys that mean something to Celery, Python or the path checks.
TRICKY_KEYS = st.sampled_from(["self", "args", "kwargs", "task", "id", "a_path", "b_paths", "__class__", ""])
any_params = st.dictionaries(
    TRICKY_KEYS | st.text(max_size=10).filter(lambda key: key not in UNBOUNDED_KEYS), json_values, max_size=5
)


def params_texts(task_type: str) -> st.SearchStrategy[str]:
    """What the API service might store in ``params``: JSON of any shape, or not JSON at all."""
    as_json = st.one_of(keys_with(WELL_FORMED[task_type]), any_params, json_values).map(json.dumps)
    return as_json | st.text(max_size=30)


@pytest.mark.parametrize("task_type", TASK_TYPES)
@FUZZ
@given(drawn=st.data())
def test_random_params_end_completed_or_with_a_clear_error(
    worker: Worker, data: Path, task_type: str, drawn: st.DataObject
) -> None:
    # Given random params for the task type
    params_text = drawn.draw(params_texts(task_type), label="params")
    # When the API service queues them, Then the job ends cleanly and the worker lives
    assert_ended_cleanly(run_row(data, task_type, params_text))
    assert worker.process.poll() is None, worker.text()[-3000:]


def test_a_param_named_self_is_an_ordinary_unknown_param(worker: Worker, data: Path) -> None:
    # (Celery's own __call__ took "self" as a keyword: the job failed with a TypeError inside Celery)
    params = {
        "input_paths": ["good.png"],
        "output_paths": ["out/self.png"],
        "width": 5,
        "height": 5,
        "self": 1,
    }
    row = run_row(data, "image_resize", json.dumps(params))
    assert row["error_message"].startswith("unknown parameter 'self' for image_resize"), row


def test_a_priority_that_is_not_a_number_runs_at_the_default_priority(worker: Worker, data: Path) -> None:
    # (intake failed on int('high') and retried the row forever, holding up the rows behind it)
    job_id = f"priority-{uuid.uuid4().hex[:6]}"
    support.insert_job(jobs(data), job_id, "ledger_echo", {"ledger_path": "priority.txt"}, priority="high")
    wait_until(
        lambda: job_row(jobs(data), job_id)["status"] == "completed",
        60,
        "the job with priority 'high' completed",
    )
    assert "has priority 'high', not a number from 0 to 10" in worker.text()


# -- 2. random bytes as images --------------------------------------------------------


@cache
def sample_images() -> tuple[tuple[str, bytes], ...]:
    """Small valid images in every format the module reads (bytes to corrupt)."""
    samples = []
    for suffix, mode in (
        ("png", "RGBA"),
        ("jpg", "RGB"),
        ("gif", "P"),
        ("bmp", "RGB"),
        ("tiff", "RGB"),
        ("webp", "RGB"),
    ):
        buffer = io.BytesIO()
        Image.new(mode, (12, 9)).save(buffer, format={"jpg": "JPEG"}.get(suffix, suffix.upper()))
        samples.append((suffix, buffer.getvalue()))
    return tuple(samples)


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, bytes): pure noise, a format's magic number then noise, or a corrupted image."""
    kind = draw(st.sampled_from(["noise", "magic", "corrupted"]))
    suffix, sample = draw(st.sampled_from(sample_images()))
    if kind == "noise":
        return suffix, draw(st.binary(max_size=2048))
    if kind == "magic":
        return suffix, sample[:12] + draw(st.binary(max_size=2048))
    flips = draw(
        st.lists(st.tuples(st.integers(0, len(sample) - 1), st.integers(0, 255)), min_size=1, max_size=8)
    )
    corrupted = bytearray(sample)
    for position, value in flips:
        corrupted[position] = value
    cut = draw(st.integers(1, len(sample)))
    return suffix, bytes(corrupted[:cut])


@FUZZ
@given(image=image_files(), task_type=st.sampled_from(["image_resize", "image_conversion"]))
def test_random_bytes_as_images_end_with_an_error_naming_the_file(
    worker: Worker, data: Path, image: tuple[str, bytes], task_type: str
) -> None:
    # Given random bytes written as an image file under CL_SERVER_DIR
    suffix, content = image
    path = data / "images" / f"{next(_serial)}.{suffix}"
    path.write_bytes(content)
    params: dict[str, Any] = {"input_paths": [str(path.relative_to(data))], "output_paths": ["out/img.png"]}
    params.update({"width": 8, "height": 8} if task_type == "image_resize" else {"format": "png"})
    # When a job reads it
    row = run_row(data, task_type, json.dumps(params))
    # Then it ends with an error naming the file (or completes: the bytes were an image)
    assert_ended_cleanly(row)
    if row["status"] == "error":
        assert str(path) in row["error_message"], row["error_message"]
    assert worker.process.poll() is None, worker.text()[-3000:]


# -- 3. random broker messages --------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/x-python-serialize",
        "application/x-yaml",
        "application/x-msgpack",
        "application/data",
        "application/text",
        "text/plain",
        "",
    ]
) | st.text(max_size=20)


def is_task_body(body: bytes) -> bool:
    """True for a well-formed protocol-2 body ([args, kwargs, embed]): a real task, not garbage."""
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], list)
        and isinstance(value[1], dict)
    )


bodies = (st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode())).filter(
    lambda body: not is_task_body(body)
)
HEADER_SHAPES = st.sampled_from(["protocol 2", "no task", "task is a list", "id is a number", "no id"])


def headers_of(shape: str, marker: str) -> dict[str, Any]:
    task = {"lang": "py", "task": "ledger_echo", "id": marker, "argsrepr": "()", "kwargsrepr": "{}"}
    return {
        "protocol 2": task,
        "no task": {"fuzz_marker": marker},
        "task is a list": {**task, "task": ["ledger_echo"]},
        "id is a number": {**task, "id": 7, "fuzz_marker": marker},
        "no id": {"lang": "py", "task": "ledger_echo", "fuzz_marker": marker},
    }[shape]


@pytest.mark.parametrize(
    ("body", "shape"),
    [(b"5", "protocol 2"), (b"[1, 2]", "protocol 2"), (b"{}", "protocol 2"), (b"[]", "task is a list")],
)
def test_messages_that_stopped_the_worker_are_dead_lettered(
    worker: Worker, data: Path, body: bytes, shape: str
) -> None:
    # (a JSON body that is not [args, kwargs, embed] made Celery stop the worker with
    # "Unrecoverable error"; a task name that is a list did too)
    marker = f"known-message-{uuid.uuid4().hex}"
    publish_raw(jobs(data), body, headers_of(shape, marker), "application/json")
    reason = wait_dead_letter(jobs(data), marker)
    assert reason.startswith("refused by the worker: "), reason
    assert "body is" in reason or "receiving it failed" in reason, reason
    assert worker.process.poll() is None, worker.text()[-3000:]


@FUZZ
@given(
    body=bodies,
    content_type=CONTENT_TYPES,
    encoding=st.sampled_from(["utf-8", "binary", "latin-1", "rot13", "nonsense"]),
    shape=HEADER_SHAPES,
)
def test_random_broker_messages_are_dead_lettered_never_run(
    worker: Worker, data: Path, body: bytes, content_type: str, encoding: str, shape: str
) -> None:
    # Given a raw message of random bytes published into a queue the worker consumes
    marker = f"fuzz-message-{uuid.uuid4().hex}"
    publish_raw(jobs(data), body, headers_of(shape, marker), content_type, encoding)
    # Then it ends in the dead-letter table with a reason, and nothing ran it
    assert wait_dead_letter(jobs(data), marker)
    assert count(jobs(data), "SELECT count(*) FROM jobs WHERE job_id = :marker", {"marker": marker}) == 0
    assert worker.process.poll() is None, worker.text()[-3000:]


# -- 4. oversized input ---------------------------------------------------------------

LIMIT = "JOB_PARAMS_MAX_BYTES=1,048,576"


def huge_params() -> dict[str, Any]:
    return {"ledger_path": "huge.txt", "echo": "x" * 2_000_000}


#: :func:`huge_params` as Python source for client scripts (too large for a command line).
HUGE = '{"ledger_path": "huge.txt", "echo": "x" * 2_000_000}'


#: How the refusal of :func:`huge_params` starts.
REFUSAL = f"params are {len(json.dumps(huge_params())):,} bytes; the limit is {LIMIT}"


def test_huge_params_row_is_refused_naming_the_limit(worker: Worker, data: Path) -> None:
    row = run_row(data, "ledger_echo", json.dumps(huge_params()))
    assert row["status"] == "error"
    assert row["error_message"].startswith(REFUSAL)
    assert not (data / "huge.txt").exists()


def test_huge_params_are_refused_at_submit(worker: Worker, data: Path, env: dict[str, str]) -> None:
    huge_rows = "SELECT count(*) FROM jobs WHERE length(params) > 1000000"
    rows_before = count(jobs(data), huge_rows)
    # Given a client with the default limit, When it submits 2 MB of params three ways
    script = f"""
from cl_tasks import app, image_resize, submit_job
from cl_tasks.messages import JobParamsTooLarge
params = {HUGE}
for send in (lambda: submit_job("ledger_echo", params), lambda: app.send_task("ledger_echo", kwargs=params),
             lambda: image_resize.delay(**params)):
    try:
        send()
    except JobParamsTooLarge as exc:
        print(exc)
"""
    refusals = run_client(env, script).splitlines()
    # Then each is refused, naming the limit, and nothing reached the jobs table or the broker
    assert len(refusals) == 3
    assert all(REFUSAL in line for line in refusals), refusals
    assert count(jobs(data), huge_rows) == rows_before
    assert count(jobs(data), "SELECT count(*) FROM kombu_message WHERE length(payload) > 1000000") == 0


def test_a_client_with_a_larger_limit_meets_the_workers_limit(
    worker: Worker, data: Path, env: dict[str, str]
) -> None:
    # Given a client whose JOB_PARAMS_MAX_BYTES is larger than the worker's
    script = f"""
from cl_tasks import submit_job
print(submit_job("ledger_echo", {HUGE}).id)
"""
    job_id = run_client({**env, "JOB_PARAMS_MAX_BYTES": "4000000"}, script).strip()
    # Then the worker ends the job error, naming its own limit
    row = wait_until(
        lambda: (row := job_row(jobs(data), job_id))["status"] == "error" and row,
        60,
        "the oversized job ended error",
    )
    message = row["error_message"]
    assert message.startswith(REFUSAL), message
    assert not (data / "huge.txt").exists()


def test_the_worker_still_serves_after_all_of_it(worker: Worker, data: Path) -> None:
    params = {"input_paths": ["good.png"], "output_paths": ["out/after-fuzz.png"], "width": 5, "height": 5}
    row = run_row(data, "image_resize", json.dumps(params))
    assert row["status"] == "completed", row
    assert (data / "out" / "after-fuzz.png").exists()
    assert worker.process.poll() is None
    assert "Unrecoverable error" not in worker.text()
