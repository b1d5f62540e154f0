"""Runner confinement (issue 15) and the database's protection from job paths (issue 14 item 1).

A hostile compute module (``tests/compute_modules/hostile_tools``) runs attacker-style
probes inside the very runner sandbox and reports what succeeded; the tests also look
at the host side (files, database rows). Four real workers serve this module: as root
and as an unprivileged user, each with ``RUNNER_CONFINEMENT=on`` and ``off``. With it
off the probes must succeed (so they can fail), with it on they must all fail.
Two probes cannot succeed as a non-root user even with confinement off (being root,
making a device node); for that user they only assert the confined outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.conftest import (
    TEST_MODULES,
    Worker,
    as_user,
    make_api_database,
    port_open,
    subprocess_env,
)

#: Secrets in every worker's environment: a runner must never read them.
MQTT_PASSWORD = f"mqtt-{secrets.token_hex(8)}"
OTHER_SECRET = f"other-{secrets.token_hex(8)}"
#: The machine's servers a runner must not reach.
PORTS = (1883, 5672, 5432, 6379)
SCENARIOS = ("root-on", "root-off", "user-on", "user-off")
PNG_ONE, PNG_TWO, PNG_SECRET = b"\x89PNG one", b"\x89PNG two", b"\x89PNG secret from outside"


@dataclass
class Scenario:
    """One worker (as root or not, confinement on or off) and what its probe jobs left."""

    name: str
    data: Path
    outside: Path
    worker: Worker
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def confined(self) -> bool:
        return self.name.endswith("-on")

    @property
    def root(self) -> bool:
        return self.name.startswith("root")

    def probes(self, job: str = "probe") -> dict[str, Any]:
        row = self.rows[job]
        assert row["status"] == "completed", row
        return dict(json.loads(row["task_output"])["probes"])


def make_layout(base: Path, owner: tuple[int, int] | None) -> tuple[Path, Path]:
    """CL_SERVER_DIR with the API's database, venvs and a modules folder inside; a folder outside."""
    data, outside = base / "data", base / "outside"
    (data / "album").mkdir(parents=True)
    outside.mkdir()
    make_api_database(data / "media_store.db")
    (data / "album" / "1.png").write_bytes(PNG_ONE)
    (data / "album" / "2.png").write_bytes(PNG_TWO)
    (outside / "2.png").write_bytes(PNG_SECRET)
    (data / "keep").mkdir()
    (data / "keep" / "result.png").write_bytes(b"the previous good output")
    shutil.copytree(TEST_MODULES / "hostile_tools", data / "modules" / "hostile_tools")
    if owner is not None:
        for path in [base, *base.rglob("*")]:
            os.chown(path, *owner, follow_symlinks=False)
    return data, outside


def run_row(data: Path, params: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """INSERT a queued hostile_probe row as the API service does; wait until it ends."""
    job_id = f"hostile-{uuid.uuid4().hex[:10]}"
    return support.run_job(data / "media_store.db", job_id, "hostile_probe", params, timeout)


def probe_jobs(scenario: Scenario) -> None:
    data, outside = scenario.data, scenario.outside
    scenario.rows["probe"] = run_row(
        data,
        {
            "database": str(data / "media_store.db"),
            "ports": list(PORTS),
            "targets": [str(data / "planted.txt"), f"/var/tmp/cl-tasks-hostile-{uuid.uuid4().hex}"],
            "mknod_in": [str(data)],
            "output_paths": ["out/report.txt"],
        },
    )
    scenario.rows["swap"] = run_row(
        data,
        {
            "input_paths": ["album/1.png", "album/2.png"],
            "output_paths": ["copies/1.png", "copies/2.png"],
            "swap_folder": str(data / "album"),
            "outside": str(outside),
        },
    )
    # Unconfined, the swap wins and stays: put the folder back for the jobs that follow
    album = data / "album"
    if album.is_symlink():
        album.unlink()
        (data / "album.orig").rename(album)
    scenario.rows["die"] = run_row(data, {"die_mid_write": True, "output_paths": ["keep/result.png"]})


@pytest.fixture(scope="module", params=SCENARIOS)
def scenario(request: pytest.FixtureRequest, unprivileged_user: tuple[int, int]) -> Iterator[Scenario]:
    name: str = request.param
    as_root = name.startswith("root")
    # Not under pytest's folders: those are root-only, and the unprivileged worker needs its own
    base = Path(tempfile.mkdtemp(prefix=f"cl-confinement-{name}-"))
    owner = None if as_root else unprivileged_user
    data, outside = make_layout(base, owner)
    env = subprocess_env(
        CL_SERVER_DIR=str(data),
        DATABASE_URL=f"sqlite:///{data / 'media_store.db'}",
        COMPUTE_MODULES_DIR=str(data / "modules"),
        WORKER_POLL_INTERVAL="1",
        BROADCAST_TYPE="noop",
        MQTT_PASSWORD=MQTT_PASSWORD,
        CL_TEST_OTHER_SECRET=OTHER_SECRET,
        RUNNER_CONFINEMENT=name.split("-")[1],
    )
    env.pop("TMPDIR", None)
    prefix = () if as_root else as_user(*unprivileged_user)
    worker = Worker(
        env, base / "worker.log", "-n", f"{name}@%h", "-c", "1", "-Q", "hostile_probe", prefix=prefix
    )
    try:
        worker.wait_ready()
        current = Scenario(name, data, outside, worker)
        probe_jobs(current)
        yield current
    finally:
        worker.stop()
        for planted in Path("/var/tmp").glob("cl-tasks-hostile-*"):
            planted.unlink()
        shutil.rmtree(base, ignore_errors=True)


# -- issue 15: what a hostile runner can reach -------------------------------------------


def test_the_worker_says_once_how_runners_are_confined(scenario: Scenario) -> None:
    lines = [line for line in scenario.worker.text().splitlines() if "runner confinement" in line]
    assert len(lines) == 1, lines
    expected = "runner confinement: bubblewrap" if scenario.confined else "runner confinement OFF"
    assert expected in lines[0], lines[0]


def test_the_worker_runs_as_the_scenarios_user(scenario: Scenario) -> None:
    status = Path(f"/proc/{scenario.worker.process.pid}/status").read_text()
    real_uid = int(status.split("Uid:")[1].split()[0])
    assert (real_uid == 0) == scenario.root, status


def test_no_secret_is_readable(scenario: Scenario) -> None:
    seen = json.dumps(scenario.probes()["secrets"])
    leaked = [secret for secret in (MQTT_PASSWORD, OTHER_SECRET) if secret in seen]
    if scenario.confined:
        assert leaked == [], seen
    else:
        assert leaked == [MQTT_PASSWORD, OTHER_SECRET], "the probe cannot find secrets even unconfined"


def test_the_database_is_neither_readable_nor_writable(scenario: Scenario) -> None:
    probes = scenario.probes()
    with sqlite3.connect(scenario.data / "media_store.db", timeout=60) as conn:
        forged = conn.execute("SELECT count(*) FROM users WHERE name = 'hostile-probe'").fetchone()[0]
    conn.close()
    if scenario.confined:
        assert isinstance(probes["db_read"], str) and "Error" in probes["db_read"], probes
        assert probes["db_write"] != "ok" and "FileNotFoundError" in probes["db_raw"], probes
        assert forged == 0
    else:
        assert probes["db_read"] == ["admin"] and probes["db_write"] == "ok" and forged == 1, probes


def test_no_tcp_connection_to_the_machines_servers(scenario: Scenario) -> None:
    assert all(port_open("127.0.0.1", port) for port in PORTS), "the machine's servers must run"
    tcp = scenario.probes()["tcp"]
    connected = sorted(int(port) for port, outcome in tcp.items() if outcome == "connected")
    assert connected == ([] if scenario.confined else sorted(PORTS)), tcp


def test_the_runner_is_not_root(scenario: Scenario) -> None:
    identity = scenario.probes()["identity"]
    if scenario.confined:
        assert identity["uid"] == identity["euid"] == identity["gid"] == 65534, identity
        assert identity["cap_eff"] == "0000000000000000" and identity["no_new_privs"] == "1", identity
    elif scenario.root:
        assert identity["uid"] == 0 and identity["cap_eff"] != "0000000000000000", identity
    else:
        assert identity["uid"] != 0, identity  # a non-root worker's runner is never root


def test_no_device_node_can_be_made(scenario: Scenario) -> None:
    made = {folder for folder, outcome in scenario.probes()["mknod"].items() if outcome == "made"}
    nodes = list(scenario.data.rglob("hostile-null"))
    if scenario.confined or not scenario.root:
        assert made == set() and nodes == [], (made, nodes)
    else:
        assert str(scenario.data) in made and nodes, made


def test_no_write_outside_its_outputs(scenario: Scenario) -> None:
    writes = scenario.probes()["writes"]
    planted = [path for path in writes if Path(path).exists()]
    if scenario.confined:
        assert planted == [], writes
        assert not (scenario.data / "out" / "report.txt").exists()  # the runner wrote no report
    else:
        assert sorted(planted) == sorted(writes), writes


def test_the_symlink_swap_race_is_lost(scenario: Scenario) -> None:
    swap = scenario.probes("swap")["swap"]
    copied = scenario.data / "copies" / "2.png"
    if scenario.confined:
        # The real folder is out of the runner's sight; swapping its scratch copy leads nowhere
        assert swap["renamed"][str(scenario.data / "album")].startswith("FileNotFoundError"), swap
        assert (scenario.data / "album").is_dir() and not (scenario.data / "album").is_symlink()
        assert swap["read_sha256"] != hashlib.sha256(PNG_SECRET).hexdigest(), swap
        assert not copied.exists() or copied.read_bytes() == PNG_TWO
        assert not [path for path in scenario.data.rglob("*.png") if path.read_bytes() == PNG_SECRET]
    else:
        assert swap["read_sha256"] == hashlib.sha256(PNG_SECRET).hexdigest(), swap
        assert copied.read_bytes() == PNG_SECRET


def test_processed_files_are_the_paths_as_given(scenario: Scenario) -> None:
    output = json.loads(scenario.rows["swap"]["task_output"])
    expected = ["copies/1.png", "copies/2.png"]
    if scenario.confined:
        assert output["processed_files"] == expected
    else:  # unconfined runners get (and echo) the resolved paths
        assert output["processed_files"] == [str(scenario.data / path) for path in expected]


def test_a_runner_killed_mid_write_leaves_the_previous_output(scenario: Scenario) -> None:
    row = scenario.rows["die"]
    # SIGKILL: -9 from Popen, or bubblewrap's 128 + 9
    assert row["status"] == "error", row
    assert any(f"exited with code {code} mid-job" in row["error_message"] for code in (-9, 137)), row
    kept = (scenario.data / "keep" / "result.png").read_bytes()
    assert kept == (b"the previous good output" if scenario.confined else b"partial")
    assert not [path.name for path in (scenario.data / "keep").iterdir() if path.name != "result.png"]


# -- issue 14 item 1: no job reads or writes the database, the venvs or the modules -------------


PROTECTED = [
    ("output_paths", "media_store.db", "a file of the database"),
    ("output_paths", "media_store.db-wal", "a file of the database"),
    ("output_paths", "media_store.db-shm", "a file of the database"),
    ("output_paths", "media_store.db-journal", "a file of the database"),
    ("output_paths", "album/../media_store.db", "a file of the database"),
    ("output_paths", "db-link", "a file of the database"),
    ("output_paths", "db-hardlink", "a link to a file of the database"),
    ("input_paths", "media_store.db", "a file of the database"),
    ("input_paths", "media_store.db-wal", "a file of the database"),
    ("output_paths", "venvs/hostile_tools/bin/planted.png", "inside the venvs or compute modules folder"),
    ("output_paths", "venvs-link/planted.png", "inside the venvs or compute modules folder"),
    ("output_paths", "modules/hostile_tools/runner.py", "inside the venvs or compute modules folder"),
    ("input_paths", "modules/hostile_tools/runner.py", "inside the venvs or compute modules folder"),
]


@pytest.mark.parametrize(("param", "path", "why"), PROTECTED)
def test_a_job_naming_a_protected_path_ends_error_naming_it(
    scenario: Scenario, param: str, path: str, why: str
) -> None:
    data = scenario.data
    # Given links into the database and the venvs (the worker made data/venvs; it is COMPUTE_VENV_DIR)
    for link, target in (("db-link", data / "media_store.db"), ("venvs-link", data / "venvs")):
        if not (data / link).is_symlink():
            (data / link).symlink_to(target)
    if not (data / "db-hardlink").exists():
        os.link(data / "media_store.db", data / "db-hardlink")
    before = (data / "media_store.db").stat().st_size
    # When a job names it
    params = {"input_paths": ["album/1.png"], "output_paths": ["out/x.png"], param: [path]}
    row = run_row(data, params)
    # Then the job ends error naming the path, and the database is intact and readable
    assert row["status"] == "error", row
    message = str(row["error_message"])
    assert f"parameter {param}[0] {path!r} leads to " in message and why in message, message
    assert "jobs may not read or write it" in message
    with sqlite3.connect(data / "media_store.db", timeout=60) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT name FROM users").fetchall() == [("admin",)] or not scenario.confined
        assert conn.execute("SELECT label FROM entities").fetchall() == [("cat",)]
    conn.close()
    assert (data / "media_store.db").stat().st_size >= before
    assert not (data / "venvs" / "hostile_tools" / "bin" / "planted.png").exists()
