"""Compute modules: discovery, one venv each (built once, rebuilt on change), time limits."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cl_tasks.modules import discover, read_module
from tests.support import (
    PYTHON,
    TEST_MODULES,
    StartWorker,
    Worker,
    count,
    insert_job,
    job_row,
    poll,
    run_client,
    subprocess_env,
    wait_for_job,
    wait_until,
)

BUILD = """
import logging, sys
from pathlib import Path
from cl_tasks.modules import read_module, venv_python
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
print(venv_python(Path(sys.argv[1]), read_module(Path(sys.argv[2]))))
"""


def build_concurrently(venvs: Path, module: Path, count: int) -> tuple[set[str], int]:
    """Start ``count`` processes that each ask for the venv; returns their answers and builds."""
    processes = [
        subprocess.Popen(
            [PYTHON, "-c", BUILD, str(venvs), str(module)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    builds = sum(err.count("building the venv of compute module") for _, err in outputs)
    return {out.strip() for out, _ in outputs}, builds


def test_venv_is_built_once_under_concurrent_start_and_reused(tmp_path: Path) -> None:
    module = tmp_path / "modules" / "ledger_tools"
    shutil.copytree(TEST_MODULES / "ledger_tools", module)
    venvs = tmp_path / "venvs"
    # When four processes start together and all need the venv
    pythons, builds = build_concurrently(venvs, module, 4)
    # Then it was built once and all of them use it
    assert builds == 1
    assert pythons == {str(venvs / "ledger_tools" / "bin" / "python")}
    assert oct(venvs.stat().st_mode & 0o777) == "0o700"
    # And later starts reuse it
    assert build_concurrently(venvs, module, 2)[1] == 0
    # And a change to the module's pyproject.toml rebuilds it, once
    pyproject = module / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.2.0"'))
    assert build_concurrently(venvs, module, 3)[1] == 1


def test_discovery_reads_the_task_types_and_narrows(tmp_path: Path) -> None:
    found = discover(TEST_MODULES)
    assert {name: module.name for name, module in found.items()} == {
        "image_resize": "image_tools",
        "image_conversion": "image_tools",
        "ledger_echo": "ledger_tools",
        "misbehave": "ledger_tools",
        "hostile_probe": "hostile_tools",
    }
    assert set(discover(TEST_MODULES, {"image_resize", "ledger_echo"})) == {"image_resize", "ledger_echo"}
    assert read_module(TEST_MODULES / "image_tools").dependencies == (
        "pillow>=11.3,<14",
        "pillow-heif>=0.18,<2",
        "pyvips>=2.2,<4",
        "pyvips-binary>=8.16,<9",
    )


def test_malformed_module_is_skipped_by_name(tmp_path: Path, caplog: object) -> None:
    modules = tmp_path / "modules"
    shutil.copytree(TEST_MODULES / "ledger_tools", modules / "ledger_tools")
    (modules / "no_types").mkdir()
    (modules / "no_types" / "pyproject.toml").write_text('[project]\nname = "no_types"\n')
    assert set(discover(modules)) == {"ledger_echo", "misbehave"}
    assert "compute module no_types: pyproject.toml needs [tool.cl_tasks] task_types" in str(
        caplog.text  # type: ignore[attr-defined]
    )


def test_module_whose_venv_cannot_be_built_is_skipped_while_others_run(
    tmp_path: Path, server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given a module whose dependency cannot be installed, beside a good one
    modules = tmp_path / "modules"
    shutil.copytree(TEST_MODULES / "ledger_tools", modules / "ledger_tools")
    broken = modules / "broken_tools"
    broken.mkdir()
    (broken / "runner.py").write_text("")
    (broken / "pyproject.toml").write_text(
        '[project]\nname = "broken_tools"\ndependencies = ["missing-dependency @ file:///nonexistent/pkg"]\n'
        '[tool.cl_tasks]\ntask_types = ["broken_echo"]\n'
    )
    env = {**jobs_env, "COMPUTE_MODULES_DIR": str(modules), "COMPUTE_VENV_DIR": str(tmp_path / "venvs")}
    database = server_dir / "media_store.db"
    insert_job(database, "broken-job", "broken_echo", {})
    insert_job(database, "good-job", "ledger_echo", {"ledger_path": "ledger.txt"})
    # When a worker is started for both
    worker = start_worker(env, "-Q", "broken_echo,ledger_echo", "-c", "1")
    # Then the broken module is named in the log, its jobs wait, the others run
    assert wait_for_job(database, "good-job")["status"] == "completed"
    log = worker.text()
    assert "compute module broken_tools: building its venv" in log
    assert "task type broken_echo (module broken_tools) is not consumed by this worker" in log
    # (the good job was inserted after the broken one and has completed: intake passed both)
    assert job_row(database, "broken-job")["status"] == "queued"


def running_runners(worker: Worker, database: Path, job_id: str, timeout: float = 30) -> list[int]:
    """The ledger_tools runner pids of ``worker`` once ``job_id`` is being processed."""

    def runners() -> list[int]:
        if job_row(database, job_id).get("status") != "processing":
            return []
        return runners_below(worker.process.pid, "ledger_tools")

    return wait_until(runners, timeout, f"job {job_id} processed by a runner")


def all_gone(pids: list[int], timeout: float = 10) -> bool:
    """Whether every process of ``pids`` has ended within ``timeout`` seconds."""
    return bool(poll(lambda: not [pid for pid in pids if Path(f"/proc/{pid}").exists()], timeout))


def stopped_hanging_job(
    server_dir: Path, env: dict[str, str], worker: Worker, limit: str
) -> dict[str, object]:
    """The row of a hanging ``misbehave`` job sent with ``limit`` (e.g. ``time_limit=2``)."""
    job_id = run_client(
        env,
        (
            "import cl_tasks\n"
            "r = cl_tasks.app.send_task('misbehave', kwargs={'mode': 'hang', 'pid_path': 'hang.pid'},"
            f" {limit})\n"
            "print(r.id)\n"
        ),
    ).strip()
    # (a confined runner sees no host pid and writes its outputs only at its end: watch its process)
    runners = running_runners(worker, server_dir / "media_store.db", job_id)
    row = wait_for_job(server_dir / "media_store.db", job_id, timeout=60)
    assert all_gone(runners)
    return row


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("soft_time_limit=1.5", "stopped: the soft time limit of 1.5 s was exceeded"),
        ("time_limit=2", "TimeLimitExceeded"),
    ],
)
def test_a_time_limit_stops_the_runner_and_fails_the_row(
    server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker, limit: str, message: str
) -> None:
    worker = start_worker(jobs_env, "-Q", "misbehave", "-c", "1")
    row = stopped_hanging_job(server_dir, jobs_env, worker, limit)
    assert row["status"] == "error"
    assert message in str(row["error_message"]), row
    if limit.startswith("time_limit"):
        assert row["progress"] == 0


def test_revoke_terminate_stops_the_runner_and_fails_the_row(
    server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    worker = start_worker(jobs_env, "-Q", "misbehave", "-c", "1")
    send = "import cl_tasks\nprint(cl_tasks.app.send_task('misbehave', kwargs={'mode': 'hang', 'pid_path': 'hang.pid'}).id)\n"
    job_id = run_client(jobs_env, send).strip()
    runners = running_runners(worker, server_dir / "media_store.db", job_id)
    run_client(jobs_env, f"import cl_tasks\ncl_tasks.app.AsyncResult({job_id!r}).revoke(terminate=True)\n")
    row = wait_for_job(server_dir / "media_store.db", job_id, timeout=60)
    assert row["status"] == "error"
    assert row["error_message"] == "revoked: terminated with SIGTERM while running"
    assert all_gone(runners)


def cmdline(pid: int) -> str:
    """``pid``'s argv joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    return [
        int(proc.name)
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and parent_of(int(proc.name)) == pid
    ]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        parent = parent_of(int(proc.name)) if proc.name.isdigit() else None
        if parent is not None:
            parents.setdefault(parent, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def runners_below(pid: int, module: str) -> list[int]:
    runners = []
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        # Under bubblewrap the bwrap processes name the runner too: count the interpreter only
        if f"{module}/runner.py" in argv and not argv.split("\0")[0].endswith("bwrap"):
            runners.append(child)
    return runners


def test_pool_processes_start_their_runners_before_the_first_job(
    jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given a prefork worker with two processes for ledger_echo, and no job sent
    worker = start_worker(jobs_env, "-Q", "ledger_echo", "-c", "2")

    # Then each of the two pool processes has started one runner already: no job waits for one
    def one_runner_each() -> dict[int, list[int]] | None:
        pools = [pid for pid in children(worker.process.pid) if "celery" in cmdline(pid)]
        found = {pool: runners_below(pool, "ledger_tools") for pool in pools}
        return found if len(found) == 2 and all(len(runners) == 1 for runners in found.values()) else None

    def tree() -> str:
        rows = [f"{pid} <- {parent_of(pid)}: {cmdline(pid)[:120]}" for pid in descendants(worker.process.pid)]
        return "two pool processes with one runner each\n" + "\n".join(rows) + "\n" + worker.text()[-2000:]

    wait_until(one_runner_each, 30, tree)


def test_a_bundled_queue_without_its_module_is_not_consumed_and_its_jobs_wait(
    tmp_path: Path, server_dir: Path, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given a worker told to consume image_resize whose module it does not serve here
    modules = tmp_path / "modules"
    shutil.copytree(TEST_MODULES / "ledger_tools", modules / "ledger_tools")
    env = {**jobs_env, "COMPUTE_MODULES_DIR": str(modules), "COMPUTE_VENV_DIR": str(tmp_path / "venvs")}
    worker = start_worker(env, "-Q", "image_resize,ledger_echo", "-c", "1")
    # When a client submits an image_resize job, then a ledger job
    run_client(env, RESIZE_THEN_LEDGER)
    database = server_dir / "media_store.db"
    # Then the ledger job ran, and the resize job's message waits in its queue (not dead-lettered)
    assert wait_for_job(database, "ledger-after")["status"] == "completed"
    assert "task type image_resize: no compute module" in worker.text()
    assert job_row(database, "resize-first")["status"] == "queued"
    assert count(database, "SELECT count(*) FROM kombu_message WHERE queue = 'image_resize'") == 1
    assert count(database, "SELECT count(*) FROM kombu_dead_letter") == 0


RESIZE_THEN_LEDGER = """
from cl_tasks.app import app
resize = {"input_paths": ["a.png"], "output_paths": ["b.png"], "width": 8}
app.send_task("image_resize", kwargs=resize, task_id="resize-first")
app.send_task("ledger_echo", kwargs={"ledger_path": "l.txt"}, task_id="ledger-after")
"""
