"""Which confinement runners get on this machine, and the command that starts one in it.

A runner decodes files users uploaded, so it is treated as hostile (see
``docs/confinement.md``). Three modes, chosen once per process by :func:`detect`:

* ``bubblewrap`` (Debian's ``bubblewrap``; the default wherever it works, as root or
  not): the runner gets its own user, pid, network, IPC, UTS and mount namespaces
  (``--unshare-all``), runs as uid/gid :data:`RUNNER_UID` without capabilities and
  with ``no_new_privs``, cannot make user namespaces (``--disable-userns``), is in a
  new session and dies with its worker process. Its filesystem holds only ``/usr``
  (and the merged-usr links), a few ``/etc`` files, its venv and interpreter, its
  module folder (all read-only), a private ``/proc`` (its own processes only),
  minimal ``/dev``, a private ``/tmp`` and, read-write, its own scratch folder at
  :data:`JOB_MOUNT`. ``CL_SERVER_DIR``, the database, other venvs and every secret
  are simply not there. Inside, :mod:`cl_tasks.sandbox` adds Landlock.
* ``landlock`` (no usable bwrap: not installed, or no user namespaces): only
  :mod:`cl_tasks.sandbox`: reads limited to the system, the venv, the module and
  the scratch folder, writes to the scratch folder, no TCP, no signals outside.
  The runner keeps the worker's uid and capabilities and shares its namespaces.
* ``off`` (``RUNNER_CONFINEMENT=off``, for tests and diagnosis): runners run as
  before this module existed, with the job's real paths, and the log says so loudly.

The worker logs one line once (from the main process) saying which mode runs and
exactly what is not confined. Jobs' files are staged by :mod:`cl_tasks.staging`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from celery import signals

from cl_tasks import sandbox
from cl_tasks.modules import Module
from cl_tasks.settings import current

logger = logging.getLogger(__name__)

#: uid and gid of a runner inside its user namespace ("nobody").
RUNNER_UID = 65534
#: Where a runner sees its scratch folder under bubblewrap.
JOB_MOUNT = "/job"
#: Where a runner sees the launcher script under bubblewrap.
LAUNCHER_MOUNT = "/run/cl-tasks/sandbox.py"
LAUNCHER = Path(sandbox.__file__).resolve()
#: System folders shown read-only, and top-level links of a merged /usr.
SYSTEM_FOLDERS = ("/usr",)
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: The few /etc files a Python program and its shared libraries read.
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
#: Seconds the start-up probe of bwrap may take.
PROBE_TIMEOUT = 20
#: Symlinks followed from a venv's python to the real interpreter, at most.
MAX_LINK_HOPS = 40


@dataclass(frozen=True)
class Launch:
    """How to start one runner: its argv and environment, and where it sees its scratch folder."""

    argv: list[str]
    env: dict[str, str]
    scratch: str | None


@dataclass(frozen=True)
class Confinement:
    """The mode runners of this process are started in (see the module docstring)."""

    mode: str
    bwrap: str = ""
    disable_userns: bool = False
    reason: str = ""

    @property
    def staged(self) -> bool:
        """Whether jobs' files are staged through a scratch folder (every mode but ``off``)."""
        return self.mode != "off"

    def launch(self, module: Module, python: Path, scratch: Path | None) -> Launch:
        """The command and environment of ``module``'s runner, scratch folder ``scratch``."""
        env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(module.path), "PYTHONUNBUFFERED": "1"}
        runner = [str(python), str(module.runner)]
        if self.mode == "off" or scratch is None:
            return Launch(runner, env, None)
        if self.mode == "landlock":
            (scratch / "tmp").mkdir(mode=0o700, exist_ok=True)
            env["TMPDIR"] = str(scratch / "tmp")
            readable = [
                *_python_folders(str(python)),
                str(module.path),
                str(LAUNCHER),
                *ETC_FILES,
                *SYSTEM_FOLDERS,
            ]
            readable += [path for path in TOP_LEVEL if os.path.exists(path)] + ["/dev/null", "/dev/urandom"]
            argv = [str(python), "-I", str(LAUNCHER), "--write", str(scratch)]
            argv += [arg for path in readable for arg in ("--read", path)]
            return Launch([*argv, "--", *runner], env, str(scratch))
        env["TMPDIR"] = "/tmp"
        argv = [*self._bwrap_base(), *_python_binds(str(python))]
        argv += ["--ro-bind", str(module.path), str(module.path), "--ro-bind", str(LAUNCHER), LAUNCHER_MOUNT]
        argv += ["--bind", str(scratch), JOB_MOUNT, "--chdir", str(module.path), "--"]
        argv += [str(python), "-I", LAUNCHER_MOUNT, "--write", JOB_MOUNT, "--write", "/tmp", "--", *runner]
        return Launch(argv, env, JOB_MOUNT)

    def _bwrap_base(self) -> list[str]:
        ids = ["--unshare-user", "--uid", str(RUNNER_UID), "--gid", str(RUNNER_UID)]
        argv = [self.bwrap, "--unshare-all", *ids, *(["--disable-userns"] if self.disable_userns else [])]
        argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "runner"]
        for folder in SYSTEM_FOLDERS:
            argv += ["--ro-bind", folder, folder]
        for path in TOP_LEVEL:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        for path in ETC_FILES:
            argv += ["--ro-bind-try", path, path]
        return [*argv, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]

    def summary(self) -> str:
        """One line for the log: the mode and exactly what is not confined."""
        abi = sandbox.landlock_abi()
        landlock = f"Landlock ABI {abi}" if abi else "no Landlock"
        if self.mode == "bubblewrap":
            return (
                f"runner confinement: bubblewrap ({self.bwrap}): own user/pid/net/ipc/uts/mount namespaces,"
                f" uid {RUNNER_UID}, no capabilities, no_new_privs, files staged; {landlock}"
                f"{'' if self.disable_userns else '; nested user namespaces NOT blocked (bwrap < 0.8)'}"
            )
        if self.mode == "landlock":
            limited = "reads, writes, TCP, signals limited" if abi >= 6 else f"limits of {landlock} only"
            return (
                f"runner confinement PARTIAL ({self.reason}): {limited}, files staged; NOT confined:"
                f" runners keep uid {os.getuid()} and its capabilities, share the worker's pid and"
                " network namespaces (UDP, UNIX sockets); install bubblewrap or see"
                " docs/confinement.md (systemd settings)"
            )
        return (
            "runner confinement OFF (RUNNER_CONFINEMENT=off): runners see the whole machine, the database,"
            " the network and the worker's secrets; never run this on user uploads"
        )


@cache
def detect() -> Confinement:
    """The confinement this process can give runners (probed once; cached)."""
    if current().runner_confinement == "off":
        return Confinement("off")
    bwrap = shutil.which("bwrap") or ("/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else "")
    if not bwrap:
        return Confinement("landlock", reason="bubblewrap (bwrap) is not installed")
    usage = _quietly([bwrap, "--help"]).stdout
    candidate = Confinement("bubblewrap", bwrap, disable_userns="--disable-userns" in usage)
    probe = _quietly([*candidate._bwrap_base(), "--", "/usr/bin/true"])
    if probe.returncode != 0:
        detail = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        return Confinement("landlock", reason=f"bwrap cannot make its namespaces here: {detail}")
    return candidate


def _quietly(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=PROBE_TIMEOUT)


@cache
def _python_layout(python: str) -> tuple[str, str]:
    """(venv, base prefix) of a venv's interpreter."""
    base = subprocess.run(
        [python, "-I", "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=PROBE_TIMEOUT,
    ).stdout.strip()
    return str(Path(python).parent.parent), base


def _python_folders(python: str) -> list[str]:
    venv, base = _python_layout(python)
    return [venv, base, os.path.dirname(os.path.realpath(python))]


@cache
def _python_binds(python: str) -> tuple[str, ...]:
    """bwrap arguments showing a venv and its interpreter read-only (symlink chain recreated)."""
    venv, base = _python_layout(python)
    shown = [venv, *SYSTEM_FOLDERS]
    args = ["--ro-bind", venv, venv]
    if not _beneath(base, shown):
        args += ["--ro-bind", base, base]
        shown.append(base)
    path = python
    for _ in range(MAX_LINK_HOPS):
        if not os.path.islink(path):
            break
        target = os.readlink(path)
        if not _beneath(path, shown):
            args += ["--symlink", target, path]
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    if not _beneath(path, shown):
        folder = os.path.dirname(path)
        args += ["--ro-bind", folder, folder]
    return tuple(args)


def _beneath(path: str, folders: list[str]) -> bool:
    return any(os.path.commonpath([path, folder]) == folder for folder in folders)


@signals.worker_ready.connect
def announce(**_: Any) -> None:
    """Say once, from the worker's main process, how runners are confined."""
    confinement = detect()
    log = logger.warning if confinement.mode != "bubblewrap" else logger.info
    log("%s", confinement.summary())
