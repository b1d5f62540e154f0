"""Test runner (stdlib only).

ledger_echo: appends the job id to params["ledger_path"], reports progress in
``steps`` steps ``seconds`` apart, returns {"echo": params.get("echo")}.
misbehave: params["mode"] = "garbage" (prints a non-JSON line), "crash" (exits 3),
"env" (returns the environment it got), "hang" (writes its pid to
params["pid_path"], then sleeps forever).
"""

import json
import os
import sys
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
    return {"echo": params.get("echo")}


def misbehave(job_id, params):
    mode = params.get("mode")
    if mode == "garbage":
        print("this is not JSON", flush=True)
        time.sleep(5)
    if mode == "crash":
        print("crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "hang":
        with open(params["pid_path"], "w") as out:
            out.write(str(os.getpid()))
        time.sleep(3600)
    return {"env": dict(os.environ), "uid": os.getuid()}


for line in sys.stdin:
    spec = json.loads(line)
    task = {"ledger_echo": ledger_echo, "misbehave": misbehave}[spec["task_type"]]
    emit(job_id=spec["job_id"], event="result", output=task(spec["job_id"], spec["params"]))
