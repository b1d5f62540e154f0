"""The limits of one job: how long it may run, how many files it may name, how large its output.

Without a limit, one job can hold a pool slot forever: an input that is a FIFO
nobody writes to (or a file on a stalled network mount) blocks its runner's
``open``, the pool slot never frees and the row stays ``processing`` after the
worker stops. Each limit is a setting (:mod:`cl_tasks.settings` reads and
validates it, a bad value is one line naming the variable) and each refusal
names the limit and the setting that raises it.

Decided:

* ``JOB_TIME_LIMIT`` (1800 s, :data:`DEFAULT_TIME_LIMIT`) applies to every job,
  whichever way it came (an API row or a Celery call), from the moment its
  worker claims it. Past it the runner's whole process group is killed (a runner
  stuck in ``open`` of a FIFO included), the row ends ``error`` naming the limit,
  and the pool slot serves the next job with a fresh runner. A job over its time
  limit is not retried: running it again would hold a slot as long again (a crash
  is retried, a limit is not). A call's own Celery ``soft_time_limit`` /
  ``time_limit`` can stop a job sooner, never later: the operator owns the pool's
  slots, so a longer job needs a larger ``JOB_TIME_LIMIT`` on the worker.
* The deadline is kept by the pool process itself (a timer beside the runner:
  :class:`Deadline`), so it holds for every pool type. The worker's own file work
  (staging the inputs in, the outputs out) cannot be interrupted that way; as a
  backstop the compute tasks get Celery's hard ``time_limit`` of
  ``JOB_TIME_LIMIT`` + :data:`HARD_LIMIT_GRACE` (unless ``task_time_limit`` is
  configured), which replaces a stuck pool process (prefork pool).
* ``JOB_MAX_PAIRS`` (1000, :data:`DEFAULT_MAX_PAIRS`): most paths in one list
  parameter (``input_paths``, ``output_paths``, any ``*_paths``). One job is one
  pool slot and one runner; a job of 100,000 photos holds both for hours and
  makes progress meaningless. Split it into several jobs.
* ``JOB_MAX_OUTPUT_PIXELS`` (100,000,000, :data:`DEFAULT_MAX_OUTPUT_PIXELS`):
  most pixels ``width`` x ``height`` (both whole numbers) a job may ask for (the cl_server compute
  API's names for an output size). 100 MP is a 10,000 x 10,000 image, about
  400 MB of RGBA while it is encoded, and above every camera's output. A
  conversion's output is its input's size, which the image runner's
  decompression-bomb limit bounds.
* Pairs and pixels are checked before any work (no runner is asked, no file is
  opened): the job ends ``error`` at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

#: Seconds a job may run by default (``JOB_TIME_LIMIT``).
DEFAULT_TIME_LIMIT = 1800.0
#: Paths one list parameter of a job may hold by default (``JOB_MAX_PAIRS``).
DEFAULT_MAX_PAIRS = 1000
#: Pixels (width x height) a job may ask for by default (``JOB_MAX_OUTPUT_PIXELS``).
DEFAULT_MAX_OUTPUT_PIXELS = 100_000_000
#: Seconds past ``JOB_TIME_LIMIT`` before Celery's hard time limit replaces a stuck pool process.
HARD_LIMIT_GRACE = 30.0


@dataclass(frozen=True)
class Deadline:
    """When a job's time is up (``time.monotonic()``) and what its row then says."""

    at: float
    message: str

    def remaining(self) -> float:
        """Seconds left, 0 once it passed."""
        return max(0.0, self.at - time.monotonic())


@dataclass(frozen=True)
class JobLimits:
    """The limits every job of this worker runs under (see the module docstring)."""

    time_limit: float = DEFAULT_TIME_LIMIT
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS

    @property
    def hard_time_limit(self) -> float:
        """Celery's hard time limit of compute tasks: the backstop of the worker's own file work."""
        return self.time_limit + HARD_LIMIT_GRACE

    def deadline(self) -> Deadline:
        """The deadline of a job that starts now."""
        message = (
            f"stopped: the job exceeded JOB_TIME_LIMIT={self.time_limit:g} s and its runner was killed;"
            " check that its inputs are regular files that can be read (not a FIFO, not on a stalled"
            " mount), or raise JOB_TIME_LIMIT on the worker for longer jobs"
        )
        return Deadline(time.monotonic() + self.time_limit, message)

    def refusal(self, params: Mapping[str, Any]) -> str | None:
        """Why ``params`` ask for more than the limits allow (naming the limit), or None."""
        for name, value in params.items():
            if name.endswith("_paths") and isinstance(value, list) and len(value) > self.max_pairs:
                return (
                    f"parameter {name} has {len(value)} paths, more than JOB_MAX_PAIRS={self.max_pairs}"
                    " input/output pairs per job; split it into several jobs (or raise JOB_MAX_PAIRS)"
                )
        width, height = params.get("width"), params.get("height")
        if _pixels(width) and _pixels(height) and width * height > self.max_output_pixels:
            return (
                f"an output of {width} x {height} = {width * height} pixels is more than"
                f" JOB_MAX_OUTPUT_PIXELS={self.max_output_pixels}; ask for a smaller size"
                " (or raise JOB_MAX_OUTPUT_PIXELS)"
            )
        return None


def _pixels(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is a pixel count (a wrong type is the runner's to name)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
