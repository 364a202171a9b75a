"""Fixtures shared by the server tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.fakesmtp import FakeSMTP
from tests.support.waiting import DeadPort


@pytest.fixture(scope="module")
def dead_port() -> Iterator[DeadPort]:
    port = DeadPort()
    yield port
    port.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[FakeSMTP]:
    server = FakeSMTP()
    yield server
    server.close()
