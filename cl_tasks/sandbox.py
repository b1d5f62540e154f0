"""The launcher inside a runner's sandbox: Landlock limits on writes, TCP and signals.

Run as a script in the module venv's interpreter (standard library only), as
``<python> -I sandbox.py --write DIR... -- <python> <runner>``: it confines itself,
says what it did on stderr (the worker's log), then execs the runner. Limits hold
for everything the runner starts and cannot be lifted (``no_new_privs`` is set).

* **Writes** (Landlock ABI 1+): creating, writing, truncating, deleting, renaming or
  linking files succeeds only beneath the ``--write`` folders (the runner's scratch
  folder and its private ``/tmp``) and on ``/dev/null``.
* **Network** (ABI 4+): no TCP ``connect`` or ``bind`` at all.
* **Scopes** (ABI 6+): no signal to, and no abstract UNIX socket of, any process
  outside the sandbox.

Reads are not limited here: under bubblewrap (:mod:`cl_tasks.confinement`) the
runner's filesystem holds only the system, its venv, its module and its scratch
folder; without bubblewrap this launcher is the only confinement there is, and the
worker has logged what that leaves open. What the kernel lacks is said on stderr
and the runner still runs; an available mechanism that fails stops the runner.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

# Landlock system calls: the same numbers on every architecture since Linux 5.13.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
# Landlock filesystem rights.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
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
#: Rights to read and run files (handled only when ``--read`` folders are given).
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR
#: Device nodes may not be made even where writes are allowed.
DEVICE_RIGHTS = MAKE_CHAR | MAKE_BLOCK
#: The write rights a rule on a single file (not a folder) may grant.
FILE_RIGHTS = WRITE_FILE | TRUNCATE
#: ABI 6: no signals to processes outside the sandbox.
SCOPE_SIGNAL = 1 << 1
#: ABI 4: TCP rights; handled without a rule, so no TCP bind or connect is allowed.
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
#: ABI 6: no abstract UNIX sockets of processes outside the sandbox.
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
USAGE = "sandbox.py [--write DIR]... [--read DIR]... -- PROGRAM [ARG]..."
#: Files a runner may write besides its folders.
WRITABLE_FILES = ("/dev/null",)


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


def confine(folders: Sequence[str], readable: Sequence[str] = ()) -> str:
    """Writes only beneath ``folders`` (and :data:`WRITABLE_FILES`), no TCP; returns a note.

    With ``readable`` folders, reads too are allowed only beneath them and ``folders``.
    """
    abi = landlock_abi()
    if abi < 1:
        return (
            f"writes and TCP are NOT limited: Landlock is not available ({os.strerror(ctypes.get_errno())})"
        )
    handled = WRITE_RIGHTS | REFER | (TRUNCATE if abi >= 3 else 0) | (READ_RIGHTS if readable else 0)
    network = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET if abi >= 6 else 0
    attr = _RulesetAttr(handled, network, scoped)
    size = ctypes.sizeof(attr) if abi >= 6 else 2 * ctypes.sizeof(ctypes.c_uint64) if abi >= 4 else 8
    ruleset = _libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), 0
    )
    if ruleset < 0:
        raise _failed("landlock_create_ruleset")
    try:
        granted = [path for path in folders if os.path.isdir(path)]
        for path in granted:
            _allow(int(ruleset), path, handled & ~DEVICE_RIGHTS)
        for path in WRITABLE_FILES:
            _allow(int(ruleset), path, handled & (FILE_RIGHTS | READ_FILE))
        shown = [path for path in readable if os.path.exists(path)]
        for path in shown:
            _allow(int(ruleset), path, READ_RIGHTS if os.path.isdir(path) else READ_FILE | EXECUTE)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _failed("prctl(PR_SET_NO_NEW_PRIVS)")
        if _libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), int(ruleset), 0) != 0:
            raise _failed("landlock_restrict_self")
    finally:
        os.close(int(ruleset))
    limits = [f"writes only to {', '.join([*granted, *WRITABLE_FILES])}, no device nodes"]
    if readable:
        limits.append(f"reads only of {', '.join(shown)} and those")
    limits.append("no TCP" if network else "TCP NOT limited (Landlock ABI < 4)")
    limits.append(
        "no signals or abstract sockets outside" if scoped else "signals NOT scoped (Landlock ABI < 6)"
    )
    return f"{'; '.join(limits)} (Landlock ABI {abi})"


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


def _parse(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    writable: list[str] = []
    readable: list[str] = []
    args = list(argv)
    while args and args[0] != "--":
        option, value = args[0], args[1] if len(args) > 1 else ""
        if option not in ("--write", "--read") or not value:
            raise SystemExit(f"sandbox: usage: {USAGE}; got {option!r}")
        (writable if option == "--write" else readable).append(os.path.realpath(value))
        del args[:2]
    if len(args) < 2:
        raise SystemExit("sandbox: no program to run after --")
    return writable, readable, args[1:]


def main(argv: Sequence[str]) -> None:
    """Confine this process as ``argv`` says, then exec the program after ``--``."""
    writable, readable, program = _parse(argv)
    print(f"sandbox: {confine(writable, readable)}", file=sys.stderr, flush=True)
    # bubblewrap sets PWD; the runner's environment stays exactly what the worker gave.
    os.execve(program[0], program, {k: v for k, v in os.environ.items() if k != "PWD"})


if __name__ == "__main__":
    main(sys.argv[1:])
