"""Waiting for space (cl_tasks.diskspace): tried again with backoff, said once per wait."""

from __future__ import annotations

import errno
import logging

import pytest

from cl_tasks import diskspace


def test_a_write_refused_for_space_waits_with_backoff_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a write that the disk refuses three times, then takes
    pauses: list[float] = []
    space = diskspace.SpaceWait("job-1", sleep=pauses.append)
    refusals = [OSError(errno.ENOSPC, "No space left on device")] * 2 + [OSError(errno.EDQUOT, "quota")]

    def write() -> str:
        if refusals:
            raise refusals.pop(0)
        return "written"

    # When it is written through the wait
    with caplog.at_level(logging.INFO, logger="cl_tasks.diskspace"):
        assert diskspace.when_space(write, space, "output /srv/out/a.png", "/srv/out") == "written"
    # Then it paused 1, 2, 4 s, said why once, and said when it went through
    assert pauses == [1.0, 2.0, 4.0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "job job-1: cannot write output /srv/out/a.png: the disk is full; free space on the filesystem"
        " of /srv/out; the job waits, trying again every 1-30 s"
    ]
    assert any("written after waiting" in r.getMessage() for r in caplog.records)


def test_pauses_stop_growing_at_the_longest_and_other_errors_are_not_waited_for() -> None:
    pauses: list[float] = []
    space = diskspace.SpaceWait("job-2", sleep=pauses.append)
    for _ in range(8):
        space.pause("x", "/srv")
    assert max(pauses) == diskspace.LONGEST_PAUSE and pauses[-2:] == [30.0, 30.0]

    def denied() -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        diskspace.when_space(denied, space, "x", "/srv")
