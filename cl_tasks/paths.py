"""Keeping jobs inside ``CL_SERVER_DIR``: the paths in ``params``, resolved and checked.

Every parameter whose name ends in ``_path`` (a string) or ``_paths`` (a list
of strings) is a path. Relative paths resolve against ``CL_SERVER_DIR``; every
path, after following symlinks, must lie inside ``CL_SERVER_DIR`` (or one of
the allowed folders), else the job fails with a message naming the parameter.
The runner receives the resolved absolute paths.

Workers pass no allowed folders (decided, see README "Bad input"): one root to
audit, matching the runner's Landlock rules; shared media is mounted inside
``CL_SERVER_DIR`` instead. ``allowed`` stays for embedding code that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cl_tasks.runner import JobError


def is_path_param(name: str) -> bool:
    """Whether parameter ``name`` holds a path (``*_path``) or paths (``*_paths``)."""
    return name.endswith(("_path", "_paths"))


def confine(params: dict[str, Any], root: Path, allowed: Iterable[Path] = ()) -> dict[str, Any]:
    """``params`` with every path parameter resolved; raises :class:`JobError` if one escapes."""
    roots = [Path(os.path.realpath(folder)) for folder in (root, *allowed)]
    confined = dict(params)
    for name, value in params.items():
        if not is_path_param(name):
            continue
        if name.endswith("_path"):
            confined[name] = _resolve(name, value, root, roots)
        elif isinstance(value, list):
            confined[name] = [_resolve(f"{name}[{i}]", item, root, roots) for i, item in enumerate(value)]
        else:
            raise JobError(f"parameter {name} must be a list of paths, got {type(value).__name__}")
    return confined


def _resolve(label: str, value: Any, root: Path, roots: list[Path]) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(f"parameter {label} must be a non-empty path string, got {value!r}")
    if "\x00" in value:
        raise JobError(f"parameter {label} contains a NUL byte")
    resolved = Path(os.path.realpath(root / value))
    if not any(resolved == folder or folder in resolved.parents for folder in roots):
        raise JobError(
            f"parameter {label} {value!r} resolves to {resolved}, outside CL_SERVER_DIR {root};"
            " use a path inside it"
        )
    return str(resolved)
