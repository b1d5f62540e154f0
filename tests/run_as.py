"""Run a program as an unprivileged user, for tests that need a non-root worker.

Usage (as root, inside a private mount namespace)::

    unshare --mount --propagation private python tests/run_as.py UID GID -- PROGRAM [ARG]...

The worker's interpreter may live under a folder other users cannot enter (pyenv
under ``/root``). Instead of changing that folder's mode on the machine, each such
folder on the way to the interpreter and to this repository is covered, in this
private mount namespace only, by a tmpfs (mode 0755) holding bind mounts of just the
entries needed. Then the ids are dropped for good and PROGRAM is exec'd.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def open_the_way(paths: list[Path]) -> None:
    """Make every folder leading to ``paths`` enterable by others (private mounts only)."""
    for path in paths:
        for depth in range(1, len(path.parts) - 1):
            folder, child = Path(*path.parts[:depth]), path.parts[depth]
            if os.stat(folder).st_mode & stat.S_IXOTH:
                continue
            stash = tempfile.mkdtemp(prefix="run-as-")
            _mount("--bind", str(folder), stash)
            _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(folder))
            (folder / child).mkdir()
            _mount("--bind", os.path.join(stash, child), str(folder / child))


def main(argv: list[str]) -> None:
    uid, gid, separator, *program = argv
    assert separator == "--" and program, __doc__
    root = Path(__file__).resolve().parent.parent
    open_the_way([Path(os.path.realpath(sys.executable)), root])
    os.setgroups([])
    os.setresgid(int(gid), int(gid), int(gid))
    os.setresuid(int(uid), int(uid), int(uid))
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
