"""Fixtures shared by the server tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from serverutil import DeadPort, SMTPSink


@pytest.fixture(scope="module")
def dead_port() -> Iterator[DeadPort]:
    port = DeadPort()
    yield port
    port.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[SMTPSink]:
    server = SMTPSink()
    yield server
    server.close()
