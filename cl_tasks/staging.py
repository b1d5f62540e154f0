"""A job's files, staged by the worker for a confined runner that never sees ``CL_SERVER_DIR``.

The worker, not the runner, touches the files a job names (see ``docs/confinement.md``):

1. **Check.** Every ``*_path`` / ``*_paths`` parameter is validated and resolved by
   :func:`cl_tasks.paths.confine` (inside ``CL_SERVER_DIR``, symlinks followed once).
2. **Open without a race.** The resolved path is then opened component by component
   from a descriptor of ``CL_SERVER_DIR``, every folder with ``O_NOFOLLOW |
   O_DIRECTORY`` and the file with ``O_NOFOLLOW``: the resolved path holds no symlink,
   so a folder swapped for a symlink after the check makes the open fail (the job ends
   ``error``) instead of leading elsewhere. No check-then-use: what is copied is what
   was checked, through the very descriptors that were checked.
3. **Refuse what is sacred.** Each folder walked through is compared (device, inode)
   with the venvs and compute modules folders, and each file with the database files
   of ``DATABASE_URL`` and the SQLite broker (``*.db`` and its ``-wal``, ``-shm``,
   ``-journal``, by folder and name, so a ``-wal`` that does not exist yet is
   protected too, and by inode, so a hard link to the database is refused too).
   Such a job ends ``error`` naming the path, before its runner starts.
4. **Stage in.** Each input is copied from its opened descriptor into the runner's
   scratch folder (``in/<param>/<index>/<name>``); the runner gets those paths. A
   copy, not a hard link: the runner cannot write to the original.
5. **Stage out.** The runner writes ``out/<param>/<index>/<name>``. After its result,
   each output is opened in the scratch folder the same safe way (a regular file, not
   a symlink, at most :data:`MAX_OUTPUT_BYTES`), copied (never linked or renamed: the
   runner may still hold it open) into a temporary name in its destination folder
   (opened safely, created when missing) and renamed into place. A runner killed
   mid-write, or a worker killed mid-copy, leaves the previous output intact.
6. **A full disk waits.** A copy in or out refused for lack of space (ENOSPC,
   EDQUOT) removes what it wrote and is tried again after a pause, logged once per
   wait; a runner whose own write failed so runs the job again after a pause
   (:mod:`cl_tasks.diskspace`). The job never ends ``error`` for it.

Roles: a parameter whose name contains ``output`` is an output, any other path
parameter an input. A module may declare others in its pyproject
(``[tool.cl_tasks.path_roles] ledger_path = "append"``): ``append`` adds what the
runner wrote to the end of the destination (``O_APPEND``). Paths in the runner's
result (``processed_files``) are given back as the job gave them; paths in its error
messages become the resolved host paths.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cl_tasks.diskspace import SpaceWait, existing_folder, fullest, is_disk_full, when_space
from cl_tasks.limits import Deadline
from cl_tasks.paths import confine, is_path_param
from cl_tasks.runner import JobError, Runner, RunnerDiskFull
from cl_tasks.settings import Settings, sqlite_path

#: Largest output file a runner may hand back, in bytes.
MAX_OUTPUT_BYTES = 8 * 1024**3
#: Files beside an SQLite database that belong to it.
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")
#: Roles a path parameter can have.
ROLES = ("input", "output", "append")
#: Bytes copied per sendfile call.
COPY_CHUNK = 1 << 24
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a file).
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Identity = tuple[int, int]


@dataclass(frozen=True)
class Protected:
    """What no job may read or write: database files (main paths) and folders."""

    databases: tuple[Path, ...]
    folders: tuple[Path, ...]

    @classmethod
    def of(cls, settings: Settings) -> Protected:
        """The jobs database and SQLite broker files, the venvs and the compute modules folder."""
        urls = (settings.database_url, settings.broker_url)
        databases = {path for url in urls if (path := sqlite_path(url)) is not None}
        return cls(tuple(sorted(databases)), (settings.venv_dir, settings.modules_dir))

    def identities(self) -> _Sacred:
        """Device and inode of each protected thing that exists now."""
        sacred = _Sacred()
        for folder in self.folders:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                sacred.folders.add(_identity(os.stat(folder)))
        for database in self.databases:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                parent = _identity(os.stat(database.parent))
                sacred.names.setdefault(parent, set()).update(database.name + s for s in DATABASE_SUFFIXES)
                for suffix in DATABASE_SUFFIXES:
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        sacred.files.add(_identity(os.stat(f"{database}{suffix}")))
        return sacred


@dataclass
class _Sacred:
    folders: set[Identity] = field(default_factory=set)
    files: set[Identity] = field(default_factory=set)
    names: dict[Identity, set[str]] = field(default_factory=dict)


def _identity(info: os.stat_result) -> Identity:
    return (info.st_dev, info.st_ino)


@dataclass(frozen=True)
class _File:
    """One path of a job: its parameter label, as given, resolved, role and scratch path."""

    label: str
    given: str
    resolved: str
    role: str
    parts: tuple[str, ...]
    inside: str


class JobFiles:
    """The staging of one job in one scratch folder (``host``, seen as ``inside`` by the runner)."""

    def __init__(
        self,
        root: Path,
        host: Path,
        inside: str,
        protected: Protected,
        roles: Mapping[str, str],
        *,
        space: SpaceWait | None = None,
    ) -> None:
        self.root, self.host, self.inside = Path(os.path.realpath(root)), host, inside
        self._protected, self._roles = protected, roles
        self._space = space or SpaceWait("?")
        self._files: list[_File] = []

    def stage(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with every path replaced by its scratch path; inputs copied in."""
        staged = self._collect(params)
        sacred = self._protected.identities()
        scratch_parent = existing_folder(str(self.host))
        when_space(
            partial(os.makedirs, self.host, mode=0o700), self._space, "a scratch folder", scratch_parent
        )
        with self._open_root() as root_fd:
            for file in self._files:
                self._stage_one(root_fd, file, sacred)
        return staged

    def check(self, params: dict[str, Any]) -> dict[str, Any]:
        """Confinement off: ``params`` resolved, protected paths refused (the runner uses them later)."""
        resolved = confine(params, self.root)
        self._collect(params)
        sacred = self._protected.identities()
        with self._open_root() as root_fd:
            for file in self._files:
                with _opened(_existing_folder(root_fd, file, sacred)) as dir_fd:
                    if dir_fd >= 0:
                        _check_name(dir_fd, file, sacred)
        return resolved

    def _collect(self, params: dict[str, Any]) -> dict[str, Any]:
        resolved = confine(params, self.root)
        staged = dict(resolved)
        for name, value in params.items():
            if not is_path_param(name):
                continue
            if isinstance(value, list):
                staged[name] = [
                    self._add(f"{name}[{i}]", name, i, given, resolved[name][i])
                    for i, given in enumerate(value)
                ]
            else:
                staged[name] = self._add(name, name, 0, value, resolved[name])
        return staged

    def _add(self, label: str, name: str, index: int, given: str, resolved: str) -> str:
        role = self._roles.get(name) or ("output" if "output" in name else "input")
        if role not in ROLES:
            raise JobError(f"module declares role {role!r} for {name}; use one of {', '.join(ROLES)}")
        relative = os.path.relpath(resolved, self.root)
        if relative == ".":
            raise JobError(f"parameter {label} {given!r} names CL_SERVER_DIR itself; name a file in it")
        side = "in" if role == "input" else "out"
        base = os.path.basename(resolved)
        file = _File(
            label, given, resolved, role, tuple(relative.split(os.sep)), f"{side}/{name}/{index}/{base}"
        )
        self._files.append(file)
        return f"{self.inside}/{file.inside}"

    def output_folders(self) -> list[str]:
        """The existing folders the job's outputs go to (``CL_SERVER_DIR`` when it has none)."""
        folders = [existing_folder(file.resolved) for file in self._files if file.role != "input"]
        return folders or [str(self.root)]

    def _stage_one(self, root_fd: int, file: _File, sacred: _Sacred) -> None:
        scratch = self.host / file.inside
        when_space(
            partial(scratch.parent.mkdir, mode=0o700, parents=True, exist_ok=True),
            self._space,
            "a scratch folder",
            str(self.host),
        )
        if file.role != "input":
            # Refused before the runner starts; checked again when the output is placed.
            with _opened(_existing_folder(root_fd, file, sacred)) as folder:
                if folder >= 0:
                    _check_name(folder, file, sacred)
            return
        with _opened(_existing_folder(root_fd, file, sacred)) as folder:
            if folder < 0:
                return  # a missing input: the runner reports it, as it would any missing file
            _check_name(folder, file, sacred)
            with _opened(_open_file(folder, file, sacred, missing_ok=True)) as source:
                if source >= 0:
                    what = f"input {file.resolved} ({file.label}) into the runner's scratch folder"
                    when_space(partial(_copy_in, source, scratch), self._space, what, str(self.host))

    def place_outputs(self) -> None:
        """Move each output the runner wrote into place (temp name + rename), or append it."""
        sacred = self._protected.identities()
        with self._open_root() as root_fd, _opened(os.open(self.host, DIR_FLAGS)) as scratch_fd:
            for file in self._files:
                if file.role != "input":
                    place = partial(_place_one, root_fd, scratch_fd, file, sacred)
                    what = f"output {file.resolved} ({file.label})"
                    when_space(place, self._space, what, existing_folder(file.resolved))

    def for_output(self, output: Any) -> Any:
        """The runner's result with scratch paths replaced by the paths as given."""
        mapping = {f"{self.inside}/{file.inside}": file.given for file in self._files}
        return _replace_strings(output, mapping)

    def for_message(self, message: str) -> str:
        """A runner's error message with scratch paths replaced by the resolved host paths."""
        for file in sorted(self._files, key=lambda f: -len(f.inside)):
            message = message.replace(f"{self.inside}/{file.inside}", file.resolved)
        return message

    def clean(self) -> None:
        """Remove this job's scratch folder (``rmtree`` works on descriptors: no symlink is followed)."""
        shutil.rmtree(self.host, ignore_errors=True)

    def _open_root(self) -> _opened:
        try:
            return _opened(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as exc:
            raise JobError(f"CL_SERVER_DIR {self.root} cannot be opened: {exc.strerror}") from None


class _opened:
    """A descriptor closed at the end of a ``with`` (-1 stands for "none")."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def _refused(file: _File, what: str) -> JobError:
    return JobError(
        f"parameter {file.label} {file.given!r} leads to {file.resolved}, {what};"
        " jobs may not read or write it"
    )


def _unopenable(file: _File, exc: OSError) -> JobError:
    return JobError(f"parameter {file.label} {file.given!r}: cannot open {file.resolved}: {exc.strerror}")


def _copy_in(source: int, scratch: Path) -> None:
    """Copy an input into the scratch folder; a copy cut short by a full disk is removed."""
    try:
        with _opened(os.open(scratch, NEW_FILE_FLAGS, 0o600)) as copy:
            _copy(source, copy)
    except OSError as exc:
        if is_disk_full(exc):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
        raise


def _place_one(root_fd: int, scratch_fd: int, file: _File, sacred: _Sacred) -> None:
    """Put one output the runner wrote in place (nothing when it made none)."""
    with _opened(_open_scratch(scratch_fd, file)) as source:
        if source < 0:
            return
        with _opened(_walk(root_fd, file, file.parts[:-1], sacred, create=True)) as folder:
            _check_name(folder, file, sacred)
            _place(folder, source, file, sacred)


def _existing_folder(root_fd: int, file: _File, sacred: _Sacred) -> int:
    """The folder of ``file`` if it exists (-1 if not), walked safely."""
    return _walk(root_fd, file, file.parts[:-1], sacred, create=False, missing_ok=True)


def _walk(
    root_fd: int,
    file: _File,
    parts: tuple[str, ...],
    sacred: _Sacred,
    *,
    create: bool,
    missing_ok: bool = False,
) -> int:
    """A descriptor of the folder ``parts`` beneath ``root_fd``, never through a symlink; -1 if missing."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if missing_ok:
                    os.close(fd)
                    return -1
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
            if _identity(os.fstat(fd)) in sacred.folders:
                raise _refused(file, "inside the venvs or compute modules folder")
    except OSError as exc:
        os.close(fd)
        if is_disk_full(exc):
            raise  # a folder that could not be made: the caller waits for space
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise JobError(
                f"parameter {file.label} {file.given!r}: a folder of {file.resolved} is a symlink or not a"
                " folder now (it changed after the path was checked); try again"
            ) from None
        raise JobError(
            f"parameter {file.label} {file.given!r}: cannot open {file.resolved}: {exc.strerror}"
        ) from None
    except JobError:
        os.close(fd)
        raise
    return fd


def _check_name(folder: int, file: _File, sacred: _Sacred) -> None:
    name = file.parts[-1]
    if name in sacred.names.get(_identity(os.fstat(folder)), ()):
        raise _refused(file, "a file of the database")
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    if _identity(info) in sacred.files:
        raise _refused(file, "a link to a file of the database")
    if _identity(info) in sacred.folders:
        raise _refused(file, "the venvs or compute modules folder")


def _open_file(folder: int, file: _File, sacred: _Sacred, *, missing_ok: bool) -> int:
    try:
        fd = os.open(file.parts[-1], FILE_FLAGS, dir_fd=folder)
    except FileNotFoundError:
        if missing_ok:
            return -1
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JobError(
                f"parameter {file.label} {file.given!r}: {file.resolved} became a symlink after it was"
                " checked; try again"
            ) from None
        raise JobError(
            f"parameter {file.label} {file.given!r}: cannot open {file.resolved}: {exc.strerror}"
        ) from None
    info = os.fstat(fd)
    if _identity(info) in sacred.files:
        os.close(fd)
        raise _refused(file, "a file of the database")
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise JobError(f"parameter {file.label} {file.given!r}: {file.resolved} is {kind}; name a file")
    return fd


def _open_scratch(scratch_fd: int, file: _File) -> int:
    """The runner's output in the scratch folder: a regular file within bounds, or -1."""
    *folders, name = file.inside.split("/")
    fd = os.dup(scratch_fd)
    try:
        for part in folders:
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        source = os.open(name, FILE_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        raise JobError(
            f"the runner's output for {file.label} is a symlink or unreadable ({exc.strerror})"
        ) from None
    finally:
        os.close(fd)
    info = os.fstat(source)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_OUTPUT_BYTES:
        os.close(source)
        raise JobError(
            f"the runner's output for {file.label} is not a regular file of at most {MAX_OUTPUT_BYTES} bytes"
        )
    return source


def _place(folder: int, source: int, file: _File, sacred: _Sacred) -> None:
    name = file.parts[-1]
    if file.role == "append":
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with _opened(_checked_target(os.open(name, flags, 0o666, dir_fd=folder), file, sacred)) as target:
            end = os.fstat(target).st_size
            try:
                _copy(source, target)
            except OSError as exc:
                if is_disk_full(exc):
                    os.ftruncate(target, end)  # tried again whole: no half-appended copy stays
                raise
        return
    temporary = f".{name}.{secrets.token_hex(6)}.cl-tasks-tmp"
    try:
        with _opened(os.open(temporary, NEW_FILE_FLAGS, 0o666, dir_fd=folder)) as target:
            _copy(source, target)
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(temporary, dir_fd=folder)
        if is_disk_full(exc):
            raise
        raise JobError(f"cannot write output {file.resolved} ({file.label}): {exc.strerror}") from None


def _checked_target(fd: int, file: _File, sacred: _Sacred) -> int:
    info = os.fstat(fd)
    if _identity(info) in sacred.files or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _refused(file, "not a regular file the job may append to")
    return fd


def _copy(source: int, target: int) -> None:
    """Copy all of ``source`` (from its start) to ``target`` in the kernel where it can."""
    offset = 0
    while True:
        try:
            sent = os.sendfile(target, source, offset, COPY_CHUNK)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                raise
            os.lseek(source, 0, os.SEEK_SET)
            while chunk := os.read(source, COPY_CHUNK):
                os.write(target, chunk)
            return
        if sent == 0:
            return
        offset += sent


def _replace_strings(value: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [_replace_strings(item, mapping) for item in value]
    if isinstance(value, dict):
        return {key: _replace_strings(item, mapping) for key, item in value.items()}
    return value


def run_job(
    runner: Runner,
    job_id: str,
    task_type: str,
    params: dict[str, Any],
    on_progress: Callable[[float], None],
    protected: Protected,
    deadline: Deadline | None = None,
) -> Any:
    """Run one job on ``runner`` with its files staged; returns its output or raises JobError.

    A runner that reports its write failed for lack of space (:class:`RunnerDiskFull`)
    runs the job again after a pause, with its files staged afresh. ``deadline`` bounds
    the runner's part (:meth:`Runner.run`); staging is the worker's own file work,
    bounded by Celery's hard time limit (:mod:`cl_tasks.limits`). A wait for space
    counts against both.
    """
    space = SpaceWait(job_id)
    roles = dict(runner.module.path_roles)

    def staged() -> Any:
        host, inside = runner.job_folder()
        files = JobFiles(runner.root, host, inside, protected, roles, space=space)
        try:
            inputs = files.stage(params)
            try:
                output = runner.run(job_id, task_type, inputs, on_progress, root=inside, deadline=deadline)
            except JobError as exc:
                # Same kind (a crashed runner stays retryable), host paths in the message.
                raise type(exc)(files.for_message(str(exc))) from None
            files.place_outputs()
            return files.for_output(output)
        finally:
            files.clean()

    while True:
        if runner.scratch is None:
            files = JobFiles(runner.root, runner.root, "", protected, roles, space=space)
            checked = files.check(params)
            try:
                output = runner.run(job_id, task_type, checked, on_progress, deadline=deadline)
            except RunnerDiskFull as exc:
                space.pause(
                    f"what its runner writes ({exc})", fullest(files.output_folders()), then="running again"
                )
                continue
            space.went_through()
            return output
        try:
            return staged()
        except RunnerDiskFull as exc:
            space.pause(f"what its runner writes ({exc})", str(runner.scratch), then="running again")
