"""Test runner (stdlib only): what attacker code inside a runner's sandbox could do.

hostile_probe runs, in the runner process itself (so inside the very same sandbox),
the probes its params ask for and returns {"probes": {name: outcome}}. An outcome
says what succeeded; the tests check the host side too (files, database rows).

params (all optional):
  database: absolute path of media_store.db -> "db_read" (rows of users or error),
      "db_write" (an INSERT into users, "ok" or error), "db_raw" (first bytes or error)
  ports: TCP ports of 127.0.0.1 -> "tcp": {port: "connected" | error}
  targets: absolute paths -> "writes": {path: "written" | error}
  mknod_in: folders (and the folder of output_paths[0]) -> "mknod": {folder: "made" | error}
      (a char device like /dev/null)
  swap_folder, outside: the symlink-swap race: after reading input_paths[0], swap
      swap_folder (and the folder of input_paths[1]) for a symlink to outside, then
      read input_paths[1] -> "swap": {"renamed": ..., "read_sha256": ...}
  die_mid_write: write the first bytes of output_paths[0], then SIGKILL itself
Always: "identity" (uid, euid, gid, CapEff, NoNewPrivs, pid) and "secrets": every
readable /proc/<pid>/environ entry whose name looks secret, by pid ("ppid" and "1" too).
"""

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import sys

SECRET_WORDS = ("PASSWORD", "SECRET", "DATABASE_URL", "BROKER_URL", "TOKEN")


def emit(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def failure(exc):
    return f"{type(exc).__name__}: {exc}"


def identity():
    status = {}
    try:
        with open("/proc/self/status") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                status[key] = value.strip()
    except OSError as exc:
        status["error"] = failure(exc)
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "cap_eff": status.get("CapEff"),
        "no_new_privs": status.get("NoNewPrivs"),
        "pid": os.getpid(),
    }


def secrets():
    found = {}
    pids = {"ppid": str(os.getppid()), "1": "1"}
    with contextlib.suppress(OSError):
        pids.update({name: name for name in os.listdir("/proc") if name.isdigit()})
    for label, pid in pids.items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                blob = environ.read().decode(errors="replace")
        except OSError:
            continue
        hits = {}
        for entry in blob.split("\0"):
            name, _, value = entry.partition("=")
            if any(word in name for word in SECRET_WORDS):
                hits[name] = value
        if hits:
            found[label] = hits
    return found


def database(path):
    outcome = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
        outcome["db_read"] = [row[0] for row in conn.execute("SELECT name FROM users")]
        with conn:
            conn.execute("INSERT INTO users (name) VALUES ('hostile-probe')")
        outcome["db_write"] = "ok"
        conn.close()
    except Exception as exc:
        outcome.setdefault("db_read", failure(exc))
        outcome.setdefault("db_write", failure(exc))
    try:
        with open(path, "rb") as raw:
            outcome["db_raw"] = raw.read(16).decode(errors="replace")
    except OSError as exc:
        outcome["db_raw"] = failure(exc)
    return outcome


def tcp(ports):
    outcome = {}
    for port in ports:
        try:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=2):
                outcome[str(port)] = "connected"
        except OSError as exc:
            outcome[str(port)] = failure(exc)
    return outcome


def writes(targets):
    outcome = {}
    for path in targets:
        try:
            with open(path, "w") as planted:
                planted.write("planted by hostile_probe\n")
            outcome[path] = "written"
        except OSError as exc:
            outcome[path] = failure(exc)
    return outcome


def mknod(folders):
    outcome = {}
    for folder in folders:
        try:
            os.mknod(os.path.join(folder, "hostile-null"), 0o20666, os.makedev(1, 3))
            outcome[folder] = "made"
        except OSError as exc:
            outcome[folder] = failure(exc)
    return outcome


def copy(source, target):
    with open(source, "rb") as data:
        content = data.read()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as out:
        out.write(content)
    return hashlib.sha256(content).hexdigest()


def swap(params):
    inputs, outputs = params["input_paths"], params["output_paths"]
    outcome = {"first_sha256": copy(inputs[0], outputs[0]), "renamed": {}}
    for folder in (params["swap_folder"], os.path.dirname(inputs[1])):
        try:
            os.rename(folder, folder + ".orig")
            os.symlink(params["outside"], folder)
            outcome["renamed"][folder] = "swapped"
        except OSError as exc:
            outcome["renamed"][folder] = failure(exc)
    try:
        outcome["read_sha256"] = copy(inputs[1], outputs[1])
    except OSError as exc:
        outcome["read_sha256"] = failure(exc)
    return outcome


def die_mid_write(params):
    with open(params["output_paths"][0], "wb") as out:
        out.write(b"partial")
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def hostile_probe(params):
    if params.get("die_mid_write"):
        die_mid_write(params)
    probes = {"identity": identity(), "secrets": secrets()}
    if "database" in params:
        probes.update(database(params["database"]))
    if "ports" in params:
        probes["tcp"] = tcp(params["ports"])
    if "targets" in params:
        probes["writes"] = writes(params["targets"])
    if "mknod_in" in params:
        outputs = [os.path.dirname(path) for path in params.get("output_paths", [])[:1]]
        probes["mknod"] = mknod([*params["mknod_in"], *outputs])
    if "swap_folder" in params:
        probes["swap"] = swap(params)
    return {"probes": probes, "processed_files": params.get("output_paths", [])}


for line in sys.stdin:
    spec = json.loads(line)
    output = hostile_probe(spec["params"])
    emit(job_id=spec["job_id"], event="result", output=output)
