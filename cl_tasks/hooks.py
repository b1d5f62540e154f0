"""Signals of a job's life, sent in the process where it happens.

Receivers (MQTT mirroring) must not raise: Celery's dispatcher logs and
swallows their errors, so a receiver can never fail a job.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: The job runs (sent at its claim with progress 0.0, then as the runner reports).
job_progress = Signal(name="job_progress", providing_args={"job_id", "progress"})
#: The job ended ``completed`` with ``output``.
job_completed = Signal(name="job_completed", providing_args={"job_id", "output"})
#: The job ended ``error`` with ``message``.
job_failed = Signal(name="job_failed", providing_args={"job_id", "message"})
