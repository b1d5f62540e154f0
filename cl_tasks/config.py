"""Celery's configuration: the checkout's ``celeryconfig.py``, the file a user edits.

``celeryconfig.py`` sits at the top of the checkout cl_tasks runs from and is
not installed into site-packages (a user's own ``celeryconfig`` module must not
clash with ours, nor ours shadow theirs). It is loaded by its path, lazily:
:data:`CELERY_CONFIG` is the mapping the app is configured from
(``app.config_from_object("cl_tasks.config:CELERY_CONFIG")``), and the file is
read when Celery first asks for a setting, never at import.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

#: The settings file a user edits, beside the ``cl_tasks`` package.
CONFIG_FILE = Path(__file__).resolve().parent.parent / "celeryconfig.py"
#: The name it is loaded under (private, so it cannot clash with any ``celeryconfig``).
MODULE_NAME = "cl_tasks._celeryconfig"


class _FileConfig(Mapping[str, Any]):
    """The public names of ``celeryconfig.py``, as Celery settings."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @cached_property
    def _settings(self) -> dict[str, Any]:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, self.path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the Celery settings file {self.path}")
        module: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return {name: value for name, value in vars(module).items() if not name.startswith("_")}

    def __getitem__(self, key: str) -> Any:
        return self._settings[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)


CELERY_CONFIG = _FileConfig(CONFIG_FILE)
