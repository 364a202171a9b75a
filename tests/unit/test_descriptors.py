"""The descriptor budget (qtwist.descriptors): listeners pause at the budget
and resume a little below it, a connection past half the reserve is closed
at once, the line about it comes once a minute, and endpoints get a backlog."""

from __future__ import annotations

import resource

import pytest
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface import implementer

from qtwist.descriptors import LOG_EVERY, DescriptorBudget, raise_soft_limit, with_backlog


@implementer(IListeningPort)
class Port:
    """A listening port's reading switch, as the budget uses it."""

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


@implementer(IStreamServerEndpoint)
class Endpoint:
    def __init__(self, port: Port) -> None:
        self.port = port

    def listen(self, factory):
        return succeed(self.port)


def listening_budget(limit: int = 140, reserve: int = 40) -> tuple[DescriptorBudget, Port, Clock]:
    clock = Clock()
    budget = DescriptorBudget(limit, lambda: reserve, clock)
    port = Port()
    budget.endpoint(Endpoint(port)).listen(object())
    return budget, port, clock


def test_listeners_pause_at_the_budget_and_resume_a_little_below_it():
    budget, port, _ = listening_budget()
    assert budget.budget == 100
    for _ in range(99):
        assert budget.opened()
    assert port.reading
    budget.opened()
    assert not port.reading
    for _ in range(5):
        budget.closed()
    assert not port.reading  # 95: not yet, or a flood would flip it on every connection
    budget.closed()
    assert port.reading


def test_past_half_the_reserve_a_connection_is_refused_and_not_counted():
    budget, _, _ = listening_budget()
    for _ in range(120):
        assert budget.opened()
    assert not budget.opened()
    assert budget.open == 120


def test_a_port_that_starts_listening_while_paused_waits_too():
    budget, _, _ = listening_budget()
    for _ in range(100):
        budget.opened()
    late = Port()
    budget.endpoint(Endpoint(late)).listen(object())
    assert not late.reading


def test_reaching_the_budget_again_and_again_is_said_once_a_minute():
    budget, _, clock = listening_budget()
    with capturedLogs() as events:
        for _ in range(3):
            while budget.opened() and budget.open < budget.budget:
                pass
            for _ in range(10):
                budget.closed()
        clock.advance(LOG_EVERY)
        while budget.opened() and budget.open < budget.budget:
            pass
    said = [event for event in events if "reach the budget" in event["log_format"]]
    assert [event["pauses"] for event in said] == [1, 3]


@pytest.mark.parametrize("description, expected", [
    ("tcp:25", "tcp:25:backlog=1024"),
    ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=1024"),
    ("tcp:25:backlog=64", "tcp:25:backlog=64"),
    ("tcp6:25:interface=\\:\\:1", "tcp6:25:interface=\\:\\:1:backlog=1024"),
    ("unix:/run/qtwist.sock", "unix:/run/qtwist.sock:backlog=1024"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_endpoints_get_a_backlog_of_1024_unless_they_set_one(description, expected):
    assert with_backlog(description) == expected


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, before[1]), before[1]))
        soft, hard = raise_soft_limit()
        assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
        assert hard == resource.RLIM_INFINITY or soft == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
