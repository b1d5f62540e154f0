"""Test runner (stdlib only).

ledger_echo: appends the job id to params["ledger_path"], reports progress in
``steps`` steps ``seconds`` apart, then, given params["output_path"], writes
``output_bytes`` bytes (the job id repeated) there through a temporary name and a
rename; returns {"echo": params.get("echo")}. An OS error of a job becomes its
error line, with the errno's name (the protocol's "errno": ENOSPC means disk full).
misbehave: params["mode"] = "garbage" (prints a non-JSON line), "crash" (exits 3),
"env" (returns the environment it got), "hang" (writes its pid to
params["pid_path"], then sleeps forever), "write_other_venv" (tries to create a
file in every folder beside its own venv, in its own venv's site-packages and
at every path of params["targets"], then returns {"writes": {path: outcome}}:
"written" or "refused: <errno name>").
"""

import errno
import json
import os
import sys
import sysconfig
import time


def emit(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def ledger_echo(job_id, params):
    with open(params["ledger_path"], "a") as ledger:
        ledger.write(job_id + "\n")
    steps = int(params.get("steps", 1))
    for step in range(1, steps + 1):
        time.sleep(float(params.get("seconds", 0)))
        emit(job_id=job_id, event="progress", progress=100.0 * step / steps)
    if "output_path" in params:
        write_atomically(params["output_path"], job_id, int(params.get("output_bytes", 4096)))
    return {"echo": params.get("echo")}


def write_atomically(path, job_id, size):
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    part = os.path.join(folder, f".{os.path.basename(path)}.part")
    try:
        with open(part, "wb") as out:
            out.write((job_id.encode() * (size // len(job_id) + 1))[:size])
        os.replace(part, path)
    except OSError:
        if os.path.exists(part):
            os.unlink(part)
        raise


def try_writes(targets):
    venvs = os.path.dirname(sys.prefix)
    folders = [os.path.join(venvs, name) for name in sorted(os.listdir(venvs))]
    paths = [os.path.join(folder, "planted-by-misbehave") for folder in folders if os.path.isdir(folder)]
    paths.append(os.path.join(sysconfig.get_paths()["purelib"], "planted-by-misbehave.pth"))
    outcome = {}
    for path in [*paths, *targets]:
        try:
            with open(path, "w") as planted:
                planted.write("import os\n")
            outcome[path] = "written"
        except OSError as exc:
            outcome[path] = f"refused: {errno.errorcode.get(exc.errno, exc.errno)}"
    return outcome


def misbehave(job_id, params):
    mode = params.get("mode")
    if mode == "garbage":
        print("this is not JSON", flush=True)
        time.sleep(5)
    if mode == "crash":
        print("crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "write_other_venv":
        return {"writes": try_writes(params.get("targets", []))}
    if mode == "hang":
        with open(params["pid_path"], "w") as out:
            out.write(str(os.getpid()))
        time.sleep(3600)
    return {"env": dict(os.environ), "uid": os.getuid()}


for line in sys.stdin:
    spec = json.loads(line)
    task = {"ledger_echo": ledger_echo, "misbehave": misbehave}[spec["task_type"]]
    try:
        output = task(spec["job_id"], spec["params"])
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "")
        emit(job_id=spec["job_id"], event="error", message=str(exc), errno=name)
        continue
    emit(job_id=spec["job_id"], event="result", output=output)
