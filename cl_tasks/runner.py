"""Runner subprocesses of compute modules and the protocol they speak.

Protocol (one JSON object per line, UTF-8):

* **in** (the worker writes to the runner's stdin), one line per job::

      {"job_id": "…", "task_type": "image_resize", "params": {…}, "root": "/job/7"}

  Paths in ``params`` are absolute and inside ``root``: the job's folder in the
  runner's scratch folder, where the worker staged its inputs and collects its
  outputs (:mod:`cl_tasks.staging`). With ``RUNNER_CONFINEMENT=off``, ``root`` is
  ``CL_SERVER_DIR`` and the paths are the job's real ones.
* **out** (the runner writes to stdout), any number of progress lines, then
  exactly one result or error line for the job::

      {"job_id": "…", "event": "progress", "progress": 50.0}
      {"job_id": "…", "event": "result", "output": {…}}
      {"job_id": "…", "event": "error", "message": "what went wrong, for the user"}
      {"job_id": "…", "event": "error", "message": "…", "errno": "ENOSPC"}

  An error line may name the ``errno`` (by name) of the OS error behind it. ``ENOSPC``
  or ``EDQUOT`` means the runner's write failed for lack of space: that is not the
  job's fault, so the job waits and runs again (:mod:`cl_tasks.diskspace`) instead
  of ending ``error``. A runner that leaves ``errno`` out gets the plain error.

* **stderr** is the runner's log; it is forwarded to the worker's log.
* The runner serves jobs until its stdin closes. It is kept warm: one per
  module per worker process, so a job costs the work, not a Python start-up.

Runners start without a shell (an argument list: nothing in a job's params
is ever parsed by a shell), in their own session (so a time limit or a
revoke stops the whole process group), with a minimal environment (no broker,
database or MQTT credentials), and die with the worker process that started
them (``PR_SET_PDEATHSIG``). They start confined as :mod:`cl_tasks.confinement`
decides (bubblewrap + the :mod:`cl_tasks.sandbox` launcher), each with a private
scratch folder (0700, under the worker's temp folder) removed when it stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cl_tasks.confinement import Confinement
from cl_tasks.diskspace import DISK_FULL_NAMES
from cl_tasks.limits import Deadline
from cl_tasks.modules import Module

logger = logging.getLogger(__name__)

#: Lines of a runner's stderr kept to explain a crash.
STDERR_TAIL_LINES = 20
#: Environment variables passed through to runners (nothing else is).
PASSED_ENV = ("LANG", "LC_ALL", "TZ", "TMPDIR")
PR_SET_PDEATHSIG = 1
#: Niceness of every runner: decoding photos is batch work, and the API service answering
#: people on the same machine must get the CPU first (its insert p99 under a busy worker,
#: bench/api_latency.py, is bound by CPU, not by the database's locks).
RUNNER_NICE = 10


class JobError(Exception):
    """A job failed; the message is what the user sees in ``jobs.error_message``."""


class RunnerCrashed(JobError):
    """The runner died mid-job (crashed or killed): not the job's input, so it is tried again."""


class RunnerDiskFull(JobError):
    """The runner could not write for lack of space (its error line says ``ENOSPC``/``EDQUOT``)."""


class JobTimedOut(JobError):
    """The job ran past its deadline and its runner was killed: a limit, so it is not tried again."""


def _die_with_parent() -> None:
    """In the runner, before exec: killed with its pool process; at nice :data:`RUNNER_NICE`."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.nice(RUNNER_NICE)


class Runner:
    """One warm runner subprocess of one module."""

    def __init__(self, module: Module, python: Path, root: Path, confinement: Confinement) -> None:
        self.module = module
        self.root = root
        #: The runner's scratch folder on the host (None when confinement is off).
        self.scratch = (
            Path(tempfile.mkdtemp(prefix=f"cl-tasks-{module.name}-")) if confinement.staged else None
        )
        launch = confinement.launch(module, python, self.scratch)
        self._scratch_inside = launch.scratch
        self._jobs = 0
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        env.update(launch.env)
        if self.scratch is None:
            env["CL_SERVER_DIR"] = str(root)
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.process = subprocess.Popen(
            launch.argv,
            cwd=module.path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads touch state between fork and exec
        )
        assert self.process.stderr is not None
        threading.Thread(target=self._forward_log, args=(self.process.stderr,), daemon=True).start()

    def _forward_log(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self._stderr_tail.append(line)
            logger.info("[%s runner] %s", self.module.name, line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def job_folder(self) -> tuple[Path, str]:
        """A fresh job folder in the scratch folder: (host path, path the runner sees)."""
        assert self.scratch is not None and self._scratch_inside is not None
        self._jobs += 1
        return self.scratch / str(self._jobs), f"{self._scratch_inside}/{self._jobs}"

    def run(
        self,
        job_id: str,
        task_type: str,
        params: dict[str, Any],
        on_progress: Callable[[float], None],
        root: str | None = None,
        deadline: Deadline | None = None,
    ) -> Any:
        """Run one job (paths inside ``root``); returns its output or raises :class:`JobError`.

        At ``deadline`` a timer kills the runner's process group, whatever it is
        blocked in (``open`` of a FIFO, a read, a full stdin pipe on our side), and
        the job raises :class:`JobTimedOut` with the deadline's message.
        """
        spec = {"job_id": job_id, "task_type": task_type, "params": params, "root": root or str(self.root)}
        if deadline is None:
            return self._exchange(spec, on_progress)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self._kill_group()

        timer = threading.Timer(deadline.remaining(), expire)
        timer.daemon = True
        timer.start()
        try:
            return self._exchange(spec, on_progress)
        except JobError:
            if expired.is_set():
                raise JobTimedOut(deadline.message) from None
            raise
        finally:
            timer.cancel()

    def _exchange(self, spec: dict[str, Any], on_progress: Callable[[float], None]) -> Any:
        """Send one job spec, read the runner's lines until its result or error."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(spec) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._crashed() from None
        for line in self.process.stdout:
            reply = self._parse(line)
            event = reply.get("event")
            if event == "progress":
                on_progress(float(reply.get("progress", 0.0)))
            elif event == "result":
                return reply.get("output")
            elif event == "error":
                message = str(reply.get("message") or "the runner reported an error without a message")
                if reply.get("errno") in DISK_FULL_NAMES:
                    raise RunnerDiskFull(message)
                raise JobError(message)
            else:
                self.kill()
                raise JobError(
                    f"runner of module {self.module.name} sent an unknown event: {line.strip()[:200]}"
                )
        raise self._crashed()

    def _parse(self, line: str) -> dict[str, Any]:
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError:
            self.kill()
            raise JobError(
                f"runner of module {self.module.name} printed a line that is not protocol JSON:"
                f" {line.strip()[:200]!r}"
            ) from None
        return reply

    def _crashed(self) -> RunnerCrashed:
        code = self.process.wait(timeout=10)
        tail = " | ".join(list(self._stderr_tail)[-5:])
        return RunnerCrashed(f"runner of module {self.module.name} exited with code {code} mid-job: {tail}")

    def _kill_group(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Stop the runner and everything it started (its whole process group)."""
        self._kill_group()
        self.process.wait(timeout=10)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class RunnerPool:
    """Warm runners of one process, one per module (owned by that process's engine)."""

    def __init__(self) -> None:
        self._runners: dict[str, Runner] = {}

    def get(self, module: Module, python: Path, root: Path, confinement: Confinement) -> Runner:
        runner = self._runners.get(module.name)
        if runner is None or not runner.alive():
            runner = self._runners[module.name] = Runner(module, python, root, confinement)
        return runner

    def discard(self, module: Module) -> None:
        runner = self._runners.pop(module.name, None)
        if runner is not None:
            runner.kill()

    def close(self) -> None:
        for name in list(self._runners):
            self._runners.pop(name).kill()
