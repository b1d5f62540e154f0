"""Background services of a worker's main process: started once it is ready, stopped at shutdown.

Intake and the capability announcer each run as one thread per worker.
``worker_ready`` is sent again after every broker reconnect, so a service is
made by the first one only. Each concern makes its own :class:`WorkerService`
and connects it (no switchboard)::

    WorkerService(make_intake, Intake.stop).connect(signals.worker_shutting_down)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from celery import signals
from celery.utils.dispatch import Signal

_S = TypeVar("_S")


class WorkerService(Generic[_S]):
    """A service ``make(consumer)`` makes and starts (None: not wanted here); ``stop`` ends it."""

    def __init__(self, make: Callable[[Any], _S | None], stop: Callable[[_S], None]) -> None:
        self._make, self._stop = make, stop
        self.service: _S | None = None
        self._made = False

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        """``worker_ready``: make the service, once."""
        if self._made or sender is None:
            return
        self._made = True
        self.service = self._make(sender)

    def on_stop(self, **_: Any) -> None:
        if self.service is not None:
            self._stop(self.service)

    def connect(self, stop_signal: Signal) -> WorkerService[_S]:
        """Start on ``worker_ready``, stop on ``stop_signal``."""
        signals.worker_ready.connect(self.on_ready, weak=False)
        stop_signal.connect(self.on_stop, weak=False)
        return self
