"""Fixtures of the chaos suite: a private Mosquitto (its helpers are in ``tests/support.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_support import PrivateMosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """A running Mosquitto of this test's own, which it may restart."""
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    broker = PrivateMosquitto(folder)
    broker.start()
    yield broker
    broker.stop()
