"""Fixtures shared by the server tests."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import settings

from tests.support.fakesmtp import FakeSMTP
from tests.support.waiting import DeadPort

# The property tests (tests/unit/test_properties_*.py) draw the same examples on
# every run and keep no example database: a CI failure then reproduces on any
# machine from the test's name alone, and no run passes or fails because of
# what an earlier run left in .hypothesis/.  HYPOTHESIS_PROFILE=explore draws
# fresh random examples on each run, for hunting new bugs by hand.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
