"""Bad input ends as ``error`` with a message a user can act on; the worker keeps serving.

One worker (prefork, 2 processes) serves every test of this module.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests import support
from tests.support import Worker, insert_job, job_row, wait_for_job


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return support.make_server_dir(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def worker(data: Path) -> Iterator[Worker]:
    queues = "image_resize,image_conversion,misbehave,ledger_echo"
    process = Worker(
        support.compute_env(data), data.parent / "worker.log", "-n", "bad@%h", "-c", "2", "-Q", queues
    )
    process.wait_ready()
    yield process
    process.stop()


def run_job(data: Path, job_id: str, task_type: str, params: object) -> dict[str, object]:
    return support.run_job(data / "media_store.db", job_id, task_type, params)


def error_of(data: Path, task_type: str, params: object) -> str:
    job_id = f"bad-{time.monotonic_ns()}"
    row = run_job(data, job_id, task_type, params)
    assert row["status"] == "error", row
    assert row["completed_at"] is not None
    return str(row["error_message"])


def resize(**params: object) -> dict[str, object]:
    return {"input_paths": ["good.png"], "output_paths": ["out/x.png"], "width": 10, "height": 10, **params}


def test_missing_param_is_named(data: Path, worker: Worker) -> None:
    params = resize()
    del params["width"]
    assert error_of(data, "image_resize", params) == "missing parameter width"


def test_mistyped_param_is_named(data: Path, worker: Worker) -> None:
    params = resize()
    params["widht"] = params.pop("width")
    assert error_of(data, "image_resize", params).startswith("unknown parameter 'widht' for image_resize")


def test_wrong_type_is_named(data: Path, worker: Worker) -> None:
    message = error_of(data, "image_resize", resize(height="tall"))
    assert message == "parameter height must be an integer from 1 to 20000, got 'tall'"


def test_mismatched_path_lists(data: Path, worker: Worker) -> None:
    message = error_of(data, "image_resize", resize(output_paths=["a.png", "b.png"]))
    assert message == "input_paths has 1 paths but output_paths has 2"


def test_params_that_are_not_json(data: Path, worker: Worker) -> None:
    assert error_of(data, "image_resize", "{not json").startswith("params is not valid JSON")


def test_unknown_task_type_stays_queued(data: Path, worker: Worker) -> None:
    # Given a row of a task type nobody serves, and after it a row of one the worker serves
    insert_job(data / "media_store.db", "unknown-type", "image_teleport", {})
    insert_job(
        data / "media_store.db", "control-after-unknown", "ledger_echo", {"ledger_path": "control.txt"}
    )
    # When the worker's intake has gone past both (the later row completed)
    assert wait_for_job(data / "media_store.db", "control-after-unknown", timeout=60)["status"] == "completed"
    # Then the unknown one is still queued, untouched
    assert job_row(data / "media_store.db", "unknown-type")["status"] == "queued"


def test_missing_image(data: Path, worker: Worker) -> None:
    message = error_of(data, "image_resize", resize(input_paths=["nope.png"]))
    assert message == f"input image {data / 'nope.png'} does not exist"


def test_unreadable_image(data: Path, worker: Worker) -> None:
    (data / "a-folder.png").mkdir()
    message = error_of(data, "image_resize", resize(input_paths=["a-folder.png"]))
    # The worker stages inputs (cl_tasks.staging): a folder is refused before the runner starts
    assert (
        message
        == f"parameter input_paths[0] 'a-folder.png': {data / 'a-folder.png'} is a folder; name a file"
    )


def test_corrupt_image(data: Path, worker: Worker) -> None:
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    message = error_of(data, "image_resize", resize(input_paths=["corrupt.jpg"]))
    assert message.startswith(f"input image {data / 'corrupt.jpg'} is not a readable image")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_naming_the_limit(data: Path, worker: Worker) -> None:
    (data / "bomb.png").write_bytes(png_claiming(30000, 30000))
    message = error_of(data, "image_resize", resize(input_paths=["bomb.png"]))
    assert message.startswith(f"input image {data / 'bomb.png'} is too large")
    assert f"limit {Image.MAX_IMAGE_PIXELS} pixels" in message


def test_unsupported_format(data: Path, worker: Worker) -> None:
    params = {"input_paths": ["good.png"], "output_paths": ["out/x.xcf"], "format": "xcf"}
    message = error_of(data, "image_conversion", params)
    assert message == (
        "parameter format must be one of ['bmp', 'gif', 'jpeg', 'jpg', 'png', 'tiff', 'webp'], got 'xcf'"
    )


def test_path_outside_the_server_dir(data: Path, worker: Worker) -> None:
    escape = "../" * 20 + "etc/passwd"
    message = error_of(data, "image_resize", resize(input_paths=[escape]))
    assert message == (
        f"parameter input_paths[0] '{escape}' resolves to /etc/passwd, outside CL_SERVER_DIR {data};"
        " use a path inside it"
    )


def test_symlink_out_of_the_server_dir(data: Path, worker: Worker) -> None:
    (data / "escape").symlink_to("/etc")
    message = error_of(data, "image_resize", resize(output_paths=["escape/evil.png"]))
    assert "resolves to /etc/evil.png, outside CL_SERVER_DIR" in message
    assert not Path("/etc/evil.png").exists()


def test_runner_that_crashes(data: Path, worker: Worker) -> None:
    message = error_of(data, "misbehave", {"mode": "crash"})
    assert message.startswith("runner of module ledger_tools exited with code 3 mid-job")
    assert "crashing on purpose" in message


def test_runner_that_prints_garbage(data: Path, worker: Worker) -> None:
    message = error_of(data, "misbehave", {"mode": "garbage"})
    assert (
        message
        == "runner of module ledger_tools printed a line that is not protocol JSON: 'this is not JSON'"
    )


def test_runner_gets_a_minimal_environment(data: Path, worker: Worker) -> None:
    row = run_job(data, "env-check", "misbehave", {"mode": "env"})
    env = json.loads(str(row["task_output"]))["env"]
    assert set(env) <= {"PATH", "HOME", "PYTHONUNBUFFERED", "CL_SERVER_DIR", "LANG", "LC_ALL", "TZ", "TMPDIR"}
    # A confined runner never sees CL_SERVER_DIR (cl_tasks.confinement), so it is not told it
    assert "CL_SERVER_DIR" not in env and env["TMPDIR"] == "/tmp"


def test_the_worker_keeps_serving_after_bad_input(data: Path, worker: Worker) -> None:
    row = run_job(data, "still-alive", "image_resize", resize(output_paths=["out/alive.png"]))
    assert row["status"] == "completed"
    assert worker.process.poll() is None
