"""Confinement of runner processes: where a compute module may write.

The worker runs as a user that owns every venv (in CI and most containers:
root), so file permissions cannot keep a module out of its own venv, another
module's venv or the worker's code. The kernel can:

* **Landlock** (Linux >= 5.13, no privilege needed) confines writes: creating,
  writing, truncating, deleting, renaming or linking files succeeds only beneath
  the ``--write`` folders (``CL_SERVER_DIR`` and the temp folder) and on
  ``/dev/null``. Reads are not confined: a module reads its interpreter, its
  libraries, certificates and fonts from places no allow-list could name, and
  the paths a *job* reads are already checked by :mod:`cl_tasks.paths`. From
  Landlock ABI 6 the runner also cannot signal processes outside its sandbox
  (it cannot kill the worker).
* Landlock can only grant, never carve out, so a ``--read-only`` folder that
  lies beneath a writable one (``COMPUTE_VENV_DIR`` defaults to
  ``$CL_SERVER_DIR/venvs``) is bind-mounted read-only in a mount namespace of
  the runner's own (propagation from the host kept, none back). That needs
  ``CAP_SYS_ADMIN`` (root); a Landlocked process can no longer unmount it.

Both survive ``exec`` and hold for everything the runner starts. The worker
starts ``<venv python> -I sandbox.py --write DIR… --read-only DIR… -- <venv
python> <runner>``: this file, run as a script in the module's interpreter
(standard library only), confines itself, says what it did on stderr (the
worker's log), then execs the runner. Decided: what the kernel lacks (no
Landlock; no mount namespace when not root) is logged there and the runner
still runs, since refusing would stop every job on older kernels; an
unexpected failure of an available mechanism stops the runner instead.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Landlock system calls: the same numbers on every architecture since Linux 5.13.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
# Landlock filesystem rights that change the filesystem (reads are left alone).
WRITE_FILE = 1 << 1
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
#: ABI 2: link/rename across folders (denied whenever not granted, so it is always handled).
REFER = 1 << 13
#: ABI 3: truncate(2) and O_TRUNC.
TRUNCATE = 1 << 14
WRITE_RIGHTS = (
    WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_CHAR
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_BLOCK
    | MAKE_SYM
)
#: The write rights a rule on a single file (not a folder) may grant.
FILE_RIGHTS = WRITE_FILE | TRUNCATE
#: ABI 6: no signals to processes outside the sandbox.
SCOPE_SIGNAL = 1 << 1
# unshare(2) and mount(2).
CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
#: Flags of the original mount a read-only bind keeps (same bits in statvfs and mount).
KEPT_MOUNT_FLAGS = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC
USAGE = "sandbox.py [--write DIR]... [--read-only DIR]... -- PROGRAM [ARG]..."
#: Files a runner may write besides its folders.
WRITABLE_FILES = ("/dev/null",)


@dataclass(frozen=True)
class Confinement:
    """Where a runner may write, and the folders that stay read-only for it."""

    writable: tuple[Path, ...]
    read_only: tuple[Path, ...] = ()

    def command(self, python: Path, program: Path) -> list[str]:
        """The argv that starts ``program`` with ``python`` inside this confinement."""
        argv = [str(python), "-I", str(Path(__file__).resolve())]
        for folder in self.writable:
            argv += ["--write", str(folder)]
        for folder in self.read_only:
            argv += ["--read-only", str(folder)]
        return [*argv, "--", str(python), str(program)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _failed(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    version = _libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(int(version), 0)


def confine_writes(folders: Sequence[str]) -> str:
    """Allow writes only beneath ``folders`` and to :data:`WRITABLE_FILES`; returns a note."""
    abi = landlock_abi()
    if abi < 1:
        return f"writes are NOT confined: Landlock is not available ({os.strerror(ctypes.get_errno())})"
    handled = WRITE_RIGHTS | REFER | (TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(handled, 0, SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else ctypes.sizeof(ctypes.c_uint64)
    ruleset = _libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), 0
    )
    if ruleset < 0:
        raise _failed("landlock_create_ruleset")
    try:
        granted = [path for path in folders if os.path.isdir(path)]
        for path in granted:
            _allow(int(ruleset), path, handled)
        for path in WRITABLE_FILES:
            _allow(int(ruleset), path, handled & FILE_RIGHTS)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _failed("prctl(PR_SET_NO_NEW_PRIVS)")
        if _libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), int(ruleset), 0) != 0:
            raise _failed("landlock_restrict_self")
    finally:
        os.close(int(ruleset))
    return f"writes confined to {', '.join([*granted, *WRITABLE_FILES])} (Landlock ABI {abi})"


def _allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneathAttr(access, fd)
        added = _libc.syscall(
            ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0
        )
        if added != 0:
            raise _failed(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def mount_read_only(folders: Sequence[str]) -> str:
    """Bind-mount ``folders`` read-only in a new mount namespace; returns a note."""
    try:
        if _libc.unshare(CLONE_NEWNS) != 0:
            raise _failed("no mount namespace")
        _mount(None, "/", MS_REC | MS_SLAVE)
        for folder in folders:
            _mount(folder, folder, MS_BIND | MS_REC)
            kept = os.statvfs(folder).f_flag & KEPT_MOUNT_FLAGS
            _mount(None, folder, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)
    except OSError as exc:
        # Not root, or a container policy forbids mounts: an environment's limit, not a bug.
        return (
            f"{', '.join(folders)} stay WRITABLE ({exc}): run the worker as root, or keep"
            " COMPUTE_VENV_DIR and COMPUTE_MODULES_DIR outside CL_SERVER_DIR and the temp folder"
        )
    return f"read-only: {', '.join(folders)} (mount namespace)"


def _mount(source: str | None, target: str, flags: int) -> None:
    encoded = None if source is None else os.fsencode(source)
    if _libc.mount(encoded, os.fsencode(target), None, ctypes.c_ulong(flags), None) != 0:
        raise _failed(f"mount({source}, {target})")


def _beneath(path: str, folders: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, folder]) == folder for folder in folders)


def _parse(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    writable: list[str] = []
    read_only: list[str] = []
    args = list(argv)
    while args and args[0] != "--":
        option, value = args[0], args[1] if len(args) > 1 else ""
        if option not in ("--write", "--read-only") or not value:
            raise SystemExit(f"sandbox: usage: {USAGE}; got {option!r}")
        (writable if option == "--write" else read_only).append(os.path.realpath(value))
        del args[:2]
    if len(args) < 2:
        raise SystemExit("sandbox: no program to run after --")
    return writable, read_only, args[1:]


def main(argv: Sequence[str]) -> None:
    """Confine this process as ``argv`` says, then exec the program after ``--``."""
    writable, read_only, program = _parse(argv)
    notes = []
    shielded = [folder for folder in read_only if os.path.isdir(folder) and _beneath(folder, writable)]
    if shielded:
        notes.append(mount_read_only(shielded))
    notes.append(confine_writes(writable))
    print(f"sandbox: {'; '.join(notes)}", file=sys.stderr, flush=True)
    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
