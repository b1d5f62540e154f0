"""MQTT mirroring against real Mosquitto: the machine's, and private ones the tests control."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mqtt_support import (
    PrivateMosquitto,
    Received,
    Subscriber,
    free_port,
    make_password_file,
    make_tls_files,
)
from tests.support import (
    Database,
    StartWorker,
    Worker,
    insert_job,
    run_celery,
    run_client,
    run_python,
    wait_for_job,
    wait_until,
)


@pytest.fixture
def prefix() -> str:
    """A topic root of this test's own on the shared broker."""
    return f"cltest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mqtt_env(jobs_env: dict[str, str], prefix: str) -> dict[str, str]:
    return {
        **jobs_env,
        "MQTT_BROKER": "127.0.0.1",
        "MQTT_PORT": "1883",
        "MQTT_TOPIC": f"{prefix}/events",
        "CAPABILITY_TOPIC_PREFIX": f"{prefix}/workers",
        "MQTT_HEARTBEAT_INTERVAL": "1",
        "WORKER_ID": "worker-1",
    }


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Callable[..., PrivateMosquitto]]:
    brokers: list[PrivateMosquitto] = []

    def make(**options: object) -> PrivateMosquitto:
        folder = tmp_path / f"mosquitto{len(brokers)}"
        folder.mkdir()
        broker = PrivateMosquitto(folder, **options)  # type: ignore[arg-type]
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


def capability(messages: list[Received], topic: str) -> list[dict[str, object]]:
    return [m.json() for m in messages if m.topic == topic and m.payload]


def test_capabilities_idle_count_and_heartbeat(
    mqtt_env: dict[str, str], prefix: str, start_worker: StartWorker
) -> None:
    topic = f"{prefix}/workers/worker-1"
    start_worker(mqtt_env, "-Q", "ledger_echo,misbehave", "-c", "2")
    # Given a subscriber that comes after the worker's first announcement (seen by a probe,
    # so the race with it is gone): it gets the retained message
    wait_announced(topic)
    subscriber = Subscriber(f"{prefix}/workers/#")
    first = subscriber.wait_for(lambda ms: any(m.retain for m in ms if m.topic == topic))[0]
    announced = first.json()
    assert set(announced) == {"id", "capabilities", "idle_count", "timestamp"}
    assert announced["id"] == "worker-1"
    assert announced["capabilities"] == ["ledger_echo", "misbehave"]
    assert announced["idle_count"] == 2
    assert abs(int(announced["timestamp"]) - time.time() * 1000) < 60_000
    # When two jobs run, idle_count drops to 0, then comes back to 2
    for n in range(2):
        run_client(
            mqtt_env,
            "import cl_tasks; cl_tasks.submit_job('ledger_echo',"
            f" {{'ledger_path': 'l.txt', 'steps': 4, 'seconds': 0.5, 'echo': {n}}})",
        )
    subscriber.wait_for(lambda ms: any(c["idle_count"] == 0 for c in capability(ms, topic)))
    counts = [
        c["idle_count"]
        for c in capability(
            subscriber.wait_for(
                lambda ms: (
                    capability(ms, topic)[-1]["idle_count"] == 2
                    and any(c["idle_count"] == 0 for c in capability(ms, topic))
                )
            ),
            topic,
        )
    ]
    assert counts[0] == 2 and 0 in counts and counts[-1] == 2
    # And an unchanged worker repeats itself every MQTT_HEARTBEAT_INTERVAL (1 s): four beats
    start = len(subscriber.on(topic))
    subscriber.wait_for(lambda ms: sum(1 for m in ms if m.topic == topic) >= start + 4, timeout=15)
    beats = subscriber.on(topic)[start:]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(beats)]
    assert len(gaps) >= 3 and all(0.6 < gap < 1.6 for gap in gaps), gaps
    subscriber.close()


@pytest.mark.stack
def test_job_events_processing_then_completed_or_error(
    mqtt_env: dict[str, str], prefix: str, database: Database, start_worker: StartWorker
) -> None:
    subscriber = Subscriber(f"{prefix}/events")
    start_worker(mqtt_env, "-Q", "ledger_echo,misbehave", "-c", "2")
    insert_job(database, "good", "ledger_echo", {"ledger_path": "l.txt", "steps": 4, "seconds": 0.6})
    insert_job(database, "bad", "misbehave", {"mode": "crash"})
    wait_for_job(database, "good")
    wait_for_job(database, "bad")
    events = subscriber.wait_for(lambda ms: sum(1 for m in ms if m.json()["event_type"] != "processing") >= 2)
    good = [m.json() for m in events if m.json()["job_id"] == "good"]
    kinds = [event["event_type"] for event in good]
    assert kinds[-1] == "completed" and set(kinds[:-1]) == {"processing"} and len(kinds) >= 3
    progress = [event["data"]["progress"] for event in good[:-1]]
    assert progress == sorted(progress) and all(isinstance(p, float) for p in progress)
    assert good[-1]["data"] == {"progress": 100.0, "task_output": {"echo": None}}
    assert all(set(event) == {"event_type", "job_id", "data", "timestamp", "progress"} for event in good)
    # Both kinds of client: the nested float (seed README) and the flat int (upstream SDK).
    assert all(event["progress"] == int(event["data"]["progress"]) for event in good)
    assert all(isinstance(event["progress"], int) for event in good)
    assert not any(m.retain for m in events)
    bad = [m.json() for m in events if m.json()["job_id"] == "bad"]
    assert bad[-1]["event_type"] == "error"
    assert bad[-1]["data"]["error"].startswith("runner of module ledger_tools exited with code 3")
    subscriber.close()


def retained(topic: str, port: int = 1883) -> bytes | None:
    """The retained payload of ``topic`` now (None when there is none)."""
    subscriber = Subscriber(topic, port)
    found = [m.payload for m in subscriber.settle() if m.retain]
    subscriber.close()
    return found[-1] if found else None


def wait_announced(topic: str) -> None:
    """Wait for a worker's first announcement (it may come a moment after "ready.")."""
    probe = Subscriber(topic)
    probe.wait_for(lambda ms: any(m.topic == topic and m.payload for m in ms))
    probe.close()


def start_announced(env: dict[str, str], topic: str, start_worker: StartWorker) -> Worker:
    """A ledger_echo worker whose retained announcement on ``topic`` is there."""
    worker = start_worker(env, "-Q", "ledger_echo", "-c", "1")
    wait_announced(topic)
    assert retained(topic)
    return worker


def test_sigterm_clears_and_sigkill_is_cleared_by_the_will(
    mqtt_env: dict[str, str], prefix: str, start_worker: StartWorker
) -> None:
    topic = f"{prefix}/workers/worker-1"
    graceful = start_announced(mqtt_env, topic, start_worker)
    graceful.process.send_signal(signal.SIGTERM)
    graceful.process.wait(timeout=30)
    assert retained(topic) is None
    killed = start_worker({**mqtt_env, "WORKER_ID": "worker-2"}, "-Q", "ledger_echo", "-c", "1", name="w2")
    topic2 = f"{prefix}/workers/worker-2"
    wait_announced(topic2)
    assert retained(topic2)
    killed.kill()
    wait_until(lambda: retained(topic2) is None, 40, "the Last Will cleared the retained message")


def test_broker_down_at_start_then_started_and_restarted(
    mqtt_env: dict[str, str],
    server_dir: Path,
    private_broker: Callable[..., PrivateMosquitto],
    start_worker: StartWorker,
) -> None:
    broker = private_broker()
    env = {**mqtt_env, "MQTT_PORT": str(broker.port), "CAPABILITY_TOPIC_PREFIX": "inference/workers"}
    database = server_dir / "media_store.db"
    # Given no broker at all: the worker starts and jobs complete
    worker = start_worker(env, "-Q", "ledger_echo", "-c", "1")
    insert_job(database, "offline", "ledger_echo", {"ledger_path": "l.txt"})
    assert wait_for_job(database, "offline", timeout=30)["status"] == "completed"
    # When the broker starts, the capabilities appear without a restart
    broker.start()
    subscriber = Subscriber("inference/workers/#", broker.port)
    subscriber.wait_for(lambda ms: any(m.payload for m in ms), timeout=30)
    subscriber.close()
    # And when it restarts mid-run, they appear again and jobs keep completing
    broker.stop()
    insert_job(database, "during-restart", "ledger_echo", {"ledger_path": "l.txt"})
    assert wait_for_job(database, "during-restart", timeout=30)["status"] == "completed"
    broker.start()
    subscriber = Subscriber("inference/workers/#", broker.port)
    found = subscriber.wait_for(lambda ms: any(m.payload for m in ms), timeout=30)
    assert json.loads(next(m.payload for m in found if m.payload))["id"] == "worker-1"
    subscriber.close()
    assert worker.process.poll() is None


def test_username_and_password(
    mqtt_env: dict[str, str],
    server_dir: Path,
    tmp_path: Path,
    private_broker: Callable[..., PrivateMosquitto],
    start_worker: StartWorker,
) -> None:
    broker = private_broker(password_file=make_password_file(tmp_path, "cl", "Pw-Right-7731"))
    broker.start()
    env = {
        **mqtt_env,
        "MQTT_PORT": str(broker.port),
        "CAPABILITY_TOPIC_PREFIX": "inference/workers",
        "MQTT_USERNAME": "cl",
        "MQTT_PASSWORD": "Pw-Right-7731",
    }
    start_worker(env, "-Q", "ledger_echo", "-c", "1")
    subscriber = Subscriber("inference/workers/#", broker.port, username="cl", password="Pw-Right-7731")
    subscriber.wait_for(lambda ms: any(m.payload for m in ms))
    subscriber.close()
    # A wrong password: one clear log line, and jobs still run
    wrong = start_worker(
        {**env, "MQTT_PASSWORD": "Pw-Wrong-1199", "WORKER_ID": "worker-2"},
        "-Q",
        "ledger_echo",
        "-c",
        "1",
        name="w2",
    )
    insert_job(server_dir / "media_store.db", "bad-auth-job", "ledger_echo", {"ledger_path": "l.txt"})
    assert wait_for_job(server_dir / "media_store.db", "bad-auth-job")["status"] == "completed"
    wrong.wait_for_log("refused the connection", timeout=20)
    assert "(check MQTT_USERNAME/MQTT_PASSWORD)" in wrong.text()
    assert "Pw-Wrong-1199" not in wrong.text() and "Pw-Right-7731" not in wrong.text()


def test_tls_with_a_test_ca(
    mqtt_env: dict[str, str],
    tmp_path: Path,
    private_broker: Callable[..., PrivateMosquitto],
    start_worker: StartWorker,
) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    broker = private_broker(tls=(ca, cert, key))
    broker.start()
    env = {
        **mqtt_env,
        "MQTT_BROKER": "localhost",
        "MQTT_PORT": str(broker.port),
        "MQTT_USE_TLS": "true",
        "MQTT_CA_FILE": str(ca),
        "CAPABILITY_TOPIC_PREFIX": "inference/workers",
    }
    start_worker(env, "-Q", "ledger_echo", "-c", "1")
    subscriber = Subscriber("inference/workers/#", broker.port, host="localhost", ca_file=str(ca))
    found = subscriber.wait_for(lambda ms: any(m.payload for m in ms))
    assert json.loads(next(m.payload for m in found if m.payload))["capabilities"] == ["ledger_echo"]
    subscriber.close()


def test_noop_makes_no_connection(
    mqtt_env: dict[str, str], server_dir: Path, start_worker: StartWorker
) -> None:
    # Given a TCP listener where the broker would be, counting connections
    port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    listener.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                continue
            except OSError:  # the listener was closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    env = {**mqtt_env, "BROADCAST_TYPE": "noop", "MQTT_PORT": str(port)}
    worker = start_worker(env, "-Q", "ledger_echo", "-c", "1")
    insert_job(server_dir / "media_store.db", "quiet", "ledger_echo", {"ledger_path": "l.txt", "steps": 2})
    assert wait_for_job(server_dir / "media_store.db", "quiet")["status"] == "completed"
    worker.wait_for_log("succeeded in")  # the task has returned: its job events would be sent
    # Then the only connection the listener got is the test's own (which shows it counts)
    with socket.create_connection(("127.0.0.1", port)) as own:
        wait_until(lambda: accepted, 10, "the listener accepted the test's own connection")
        stop.set()
        listener.close()
        assert [address for _, address in accepted] == [own.getsockname()]


def test_worker_id_must_be_one_topic_level(mqtt_env: dict[str, str], tmp_path: Path) -> None:
    result = run_celery({**mqtt_env, "WORKER_ID": "site/worker-1"}, "worker", "-Q", "ledger_echo", timeout=60)
    assert result.returncode != 0
    assert "WORKER_ID='site/worker-1' must be one MQTT topic level" in result.stderr


def test_cleanup_mqtt_clears_exactly_the_matching_retained_topics(prefix: str) -> None:
    for topic in (f"{prefix}/workers/a", f"{prefix}/workers/b/c", f"{prefix}/keep/x"):
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-t", topic, "-m", "here", "-r", "-q", "1"], check=True
        )
    result = run_python(
        None, "-m", "cl_tasks.cli", "cleanup-mqtt", f"{prefix}/workers/#", "127.0.0.1", "1883"
    )
    assert result.returncode == 0, result.stderr
    assert f"cleared {prefix}/workers/a" in result.stdout and f"cleared {prefix}/workers/b/c" in result.stdout
    assert "2 retained message(s) cleared" in result.stdout
    assert retained(f"{prefix}/workers/#") is None
    assert retained(f"{prefix}/keep/x") == b"here"
    legacy = run_python(None, "cleanup_mqtt.py", f"{prefix}/keep/#", cwd=Path(__file__).parent.parent)
    assert "1 retained message(s) cleared" in legacy.stdout, legacy.stderr


def test_celery_control_shutdown_clears_the_retained_message(
    mqtt_env: dict[str, str], prefix: str, start_worker: StartWorker
) -> None:
    topic = f"{prefix}/workers/worker-1"
    worker = start_announced(mqtt_env, topic, start_worker)
    node = f"w1@{socket.gethostname()}"
    run_celery(mqtt_env, "control", "shutdown", "-d", node, "-t", "3", timeout=60)
    worker.process.wait(timeout=30)
    assert retained(topic) is None
