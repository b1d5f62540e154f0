"""What the README and deploy/ promise: the quick start's first job, its SQL insert, the chart, the unit."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from bench.chart import RECORDED, render
from tests.support import PYTHON, ROOT, Worker, make_api_database, subprocess_env, wait_for_job

README = (ROOT / "README.md").read_text()
UNIT = (ROOT / "deploy" / "cl-tasks-worker.service").read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def first_job_blocks() -> tuple[str, str, str]:
    """The quick start's first job: (Flower, the CLI's submit, the API's insert)."""
    section = README.split("### A first job, end to end", 1)[1].split("\n## ", 1)[0]
    flower, submit, insert = bash_blocks(section)
    return flower, submit, insert


def sql_insert_script() -> str:
    """The Python the README pipes into ``python -`` to insert a job as the API does."""
    return first_job_blocks()[2].split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]


def insert_as_the_readme(folder: Path, era: str) -> subprocess.CompletedProcess[str]:
    """The README's insert, run in ``folder`` on a ``data/media_store.db`` of the API's ``era``."""
    (folder / "data").mkdir(parents=True)
    make_api_database(folder / "data" / "media_store.db", era=era)
    script = sql_insert_script()
    return subprocess.run([PYTHON, "-"], input=script, text=True, cwd=folder, capture_output=True, timeout=60)


def test_readme_starts_with_the_two_commands() -> None:
    first = bash_blocks(README)[0]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == [
        "scripts/worker.sh",
        "scripts/test.sh",
    ]
    assert README.index("scripts/worker.sh") < README.index("## Configuration")


def test_readme_sql_insert_fills_every_not_null_column_of_the_api_table(tmp_path: Path) -> None:
    # Given the API's era-A table (its exact DDL: NOT NULL columns have no server defaults)
    # When the README's insert runs on it
    inserted = insert_as_the_readme(tmp_path / "a", "a")
    # Then the row is there, queued, as the API writes it
    assert inserted.returncode == 0, inserted.stderr
    with sqlite3.connect(tmp_path / "a" / "data" / "media_store.db") as db:
        row = db.execute(
            "SELECT status, progress, retry_count, max_retries FROM jobs WHERE job_id = 'api-job-1'"
        ).fetchone()
    assert row == ("queued", 0, 0, 3)
    # And an era-B table also needs priority, as the README says
    refused = insert_as_the_readme(tmp_path / "b", "b")
    assert "NOT NULL constraint failed: jobs.priority" in refused.stderr


def run_bash(commands: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = ["bash", "-euo", "pipefail", "-c", commands]
    return subprocess.run(script, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_readme_first_job_runs_as_written(tmp_path: Path) -> None:
    # Given a worker on a fresh ./data, as `scripts/worker.sh` starts it (the bundled modules)
    data = tmp_path / "data"
    env = subprocess_env(CL_SERVER_DIR=str(data), BROADCAST_TYPE="noop")
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "COMPUTE_MODULES_DIR", "COMPUTE_VENV_DIR"):
        env.pop(name, None)
    env["PATH"] = f"{Path(PYTHON).parent}:{env['PATH']}"  # what `source .venv/bin/activate` does
    worker = Worker(env, tmp_path / "worker.log", "-Q", "image_resize", "-c", "1")
    try:
        worker.wait_ready()
        # When the README's terminal-3 commands run, then its API insert
        _, submit, insert = first_job_blocks()
        commands = "\n".join(line for line in submit.splitlines() if not line.startswith("source "))
        submitted = run_bash(commands, tmp_path, env)
        assert submitted.returncode == 0, submitted.stderr
        assert '"processed_files": [\n    "out/photo-64.png"' in submitted.stdout
        inserted = run_bash(insert, tmp_path, env)
        assert inserted.returncode == 0, inserted.stderr
        # Then both jobs complete, and the images are where the README says
        assert wait_for_job(data / "media_store.db", "api-job-1")["status"] == "completed"
        assert (data / "out" / "photo-64.png").is_file() and (data / "out" / "photo-32.png").is_file()
    finally:
        worker.stop()


def test_performance_chart_renders_from_the_recorded_run(tmp_path: Path) -> None:
    chart = render(RECORDED, tmp_path / "performance.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 20_000
    assert (ROOT / "docs" / "performance.png").is_file()
    assert "(docs/performance.png)" in README
    assert "(performance.png)" in (ROOT / "docs" / "performance.md").read_text()


@pytest.mark.parametrize(
    "line",
    [
        "User=cl-tasks",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/cl_server",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestartPreventExitStatus=2",
    ],
)
def test_systemd_unit_is_hardened(line: str) -> None:
    assert line in UNIT.splitlines()


def test_systemd_unit_keeps_the_network_the_worker_needs() -> None:
    active = [line for line in UNIT.splitlines() if not line.startswith("#")]
    assert not any(line.startswith(("PrivateNetwork=", "RestrictNamespaces=")) for line in active)
    assert "PrivateNetwork=yes" in UNIT  # documented, for runners-only units
