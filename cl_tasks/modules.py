"""Compute modules: discovery under ``COMPUTE_MODULES_DIR`` and one virtualenv each.

A module is a folder with a ``pyproject.toml`` that declares what it runs::

    [project]
    name = "image_tools"
    dependencies = ["pillow>=10"]

    [tool.cl_tasks]
    task_types = ["image_resize", "image_conversion"]
    runner = "runner.py"          # default: runner.py

    [tool.cl_tasks.path_roles]    # optional; see cl_tasks.staging
    ledger_path = "append"        # input (default), output (name has "output"), append

Its virtualenv lives in ``COMPUTE_VENV_DIR/<module>`` and is built on first
use: exactly once even when several worker processes start together (an
``fcntl`` lock on ``<module>.lock``), and again when the module's
``pyproject.toml`` changes (its hash is kept in the venv). The venv is built
with ``uv`` (a dependency of cl_tasks: the binary its Python package installed
beside this interpreter, found with ``uv.find_uv_bin()`` whether or not
``.venv/bin`` is on ``PATH``; else a ``uv`` on ``PATH``): about a second instead
of ~16 s per module with ``venv`` + ``pip``, which remain the fallback when no
``uv`` binary can be found. A module without dependencies gets a venv without pip.
Folders are created owner-only.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from uv import find_uv_bin

logger = logging.getLogger(__name__)

#: File inside a venv holding the hash of the pyproject.toml it was built from.
HASH_FILE = ".cl_tasks-pyproject.sha256"
#: Seconds a venv build may take before it is given up as failed.
BUILD_TIMEOUT = 900


class ModuleError(RuntimeError):
    """Raised when a compute module is malformed or its venv cannot be built."""


@dataclass(frozen=True)
class Module:
    """One compute module folder and what it declares."""

    name: str
    path: Path
    task_types: tuple[str, ...]
    dependencies: tuple[str, ...]
    runner: Path
    #: (parameter, role) pairs declared under [tool.cl_tasks.path_roles].
    path_roles: tuple[tuple[str, str], ...] = ()

    @property
    def pyproject(self) -> Path:
        return self.path / "pyproject.toml"


def read_module(folder: Path) -> Module:
    """The :class:`Module` of ``folder`` (raises :class:`ModuleError` naming the problem)."""
    try:
        data = tomllib.loads((folder / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModuleError(f"compute module {folder.name}: cannot read pyproject.toml: {exc}") from exc
    table = data.get("tool", {}).get("cl_tasks", {})
    task_types = table.get("task_types")
    if not isinstance(task_types, list) or not task_types or not all(isinstance(t, str) for t in task_types):
        raise ModuleError(
            f'compute module {folder.name}: pyproject.toml needs [tool.cl_tasks] task_types = ["..."]'
        )
    dependencies = data.get("project", {}).get("dependencies", [])
    runner = folder / str(table.get("runner", "runner.py"))
    if not runner.is_file():
        raise ModuleError(f"compute module {folder.name}: runner {runner} does not exist")
    roles = table.get("path_roles", {})
    if not isinstance(roles, dict) or not all(isinstance(v, str) for v in roles.values()):
        raise ModuleError(f'compute module {folder.name}: [tool.cl_tasks.path_roles] maps names to "role"')
    return Module(
        folder.name, folder, tuple(task_types), tuple(dependencies), runner, tuple(sorted(roles.items()))
    )


def discover(modules_dir: Path, supported: Iterable[str] = ()) -> dict[str, Module]:
    """Task type -> module for every module under ``modules_dir``, narrowed to ``supported``.

    Malformed modules are logged by name and skipped; the others are returned.
    """
    wanted = frozenset(supported)
    found: dict[str, Module] = {}
    if not modules_dir.is_dir():
        logger.warning("COMPUTE_MODULES_DIR %s does not exist: no compute modules", modules_dir)
        return found
    for folder in sorted(modules_dir.iterdir()):
        if not (folder / "pyproject.toml").is_file():
            continue
        try:
            module = read_module(folder)
        except ModuleError as exc:
            logger.error("%s; skipped", exc)
            continue
        for task_type in module.task_types:
            if wanted and task_type not in wanted:
                continue
            if task_type in found:
                logger.error(
                    "task type %s is declared by modules %s and %s; using %s",
                    task_type,
                    found[task_type].name,
                    module.name,
                    found[task_type].name,
                )
                continue
            found[task_type] = module
    return found


def _digest(module: Module) -> str:
    return hashlib.sha256(module.pyproject.read_bytes()).hexdigest()


def venv_python(venv_dir: Path, module: Module) -> Path:
    """The interpreter of ``module``'s venv, built (once, under a lock) if missing or stale."""
    venv_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    venv = venv_dir / module.name
    python = venv / "bin" / "python"
    digest = _digest(module)
    with (venv_dir / f"{module.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / HASH_FILE
        if python.exists() and marker.exists() and marker.read_text() == digest:
            return python
        logger.info("building the venv of compute module %s in %s", module.name, venv)
        if venv.exists():
            shutil.rmtree(venv)
        try:
            _build(venv, module)
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            detail = getattr(exc, "stderr", None) or str(exc)
            message = str(detail).strip()[-800:]
            raise ModuleError(
                f"compute module {module.name}: building its venv in {venv} failed: {message}"
            ) from exc
        marker.write_text(digest)
    return python


#: uv's cache, beside the venvs (unless ``UV_CACHE_DIR`` is set).
UV_CACHE = ".uv-cache"


def uv_binary() -> str | None:
    """The ``uv`` executable: the ``uv`` package's beside this Python, else one on ``PATH``."""
    try:
        return str(find_uv_bin())
    except FileNotFoundError:  # a uv package without its binary (an unusual install)
        return shutil.which("uv")


def _build(venv: Path, module: Module) -> None:
    uv = uv_binary()
    python = str(venv / "bin" / "python")
    if uv:
        # uv caches under $HOME by default; a worker's user may have no writable home (a
        # systemd user, or root's HOME kept by runuser): the venv folder is ours to write.
        env = {**os.environ, "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR") or str(venv.parent / UV_CACHE)}
        _check([uv, "venv", "--python", sys.executable, str(venv)], env)
        if module.dependencies:
            _check([uv, "pip", "install", "--python", python, *module.dependencies], env)
    elif module.dependencies:
        _check([sys.executable, "-m", "venv", str(venv)])
        _check(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *module.dependencies]
        )
    else:
        _check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    os.chmod(venv, 0o700)


def _check(command: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env)
