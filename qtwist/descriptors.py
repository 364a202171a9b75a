"""The process's file descriptors: as many as the system allows, and a budget
for client connections that keeps a reserve for the server's own work.

Every connection a listener accepts holds a descriptor, whether it becomes
a session, waits for its TLS handshake or is being refused.  Clients must
never take the last ones: queue segments, control reloads, DNS look-ups,
remote deliveries, TLS and the local delivery child's pipes need theirs.
At the budget the listeners stop accepting, so new clients wait in the
kernel's listen backlog instead of meeting EMFILE, and they start again as
soon as connections end.  A listener accepts many connections in one go
before it notices (Twisted's accept loop), so past the budget and half the
reserve a connection is closed at once, which frees its descriptor.
"""

from __future__ import annotations

import resource
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="qtwist.descriptors")

# Descriptors kept for the server itself, besides one per remote delivery and
# per worker thread (each may hold a socket or a file).
RESERVE = 128
# Listen backlog unless the endpoint says otherwise: a burst of connects waits
# in the kernel rather than being refused (Twisted's default is 50).
BACKLOG = 1024
# Under a flood the budget is met again and again: one line a minute says so.
LOG_EVERY = 60.0


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # kept as it was; the log line says so
    return soft, hard


def with_backlog(description: str) -> str:
    """A TCP or UNIX endpoint string with ``backlog=BACKLOG`` unless it sets one."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={BACKLOG}"
    return description


class DescriptorBudget:
    """Counts the connections of every listener and pauses them all at the budget.

    ``reserve`` gives the descriptors to keep free as now configured.
    Factories call ``opened`` for each connection they build a protocol for
    (and build none when it says no), and the protocol calls ``closed`` once
    when it ends.
    """

    def __init__(self, limit: int, reserve: Callable[[], int], clock: IReactorTime) -> None:
        self.limit = limit
        self.reserve = reserve
        self.clock = clock
        self.open = 0
        self._ports: list[IListeningPort] = []
        self._paused = False
        self._pauses = 0  # since the last line about them
        self._said_at: float | None = None

    @property
    def budget(self) -> int:
        return max(1, self.limit - self.reserve())

    def opened(self) -> bool:
        """Count a new connection; False, counting nothing, when it must be
        closed at once (half the reserve is gone too)."""
        if self.open >= self.budget + self.reserve() // 2:
            return False
        self.open += 1
        if self.open >= self.budget and not self._paused:
            self._paused = True
            self._pauses += 1
            for port in self._ports:
                port.stopReading()
            now = self.clock.seconds()
            if self._said_at is None or now - self._said_at >= LOG_EVERY:
                log.warn("descriptors: {open} client connections reach the budget of {budget} (of {limit} "
                         "descriptors, the rest kept for the server's own work); new clients wait in the "
                         "listen backlog until some end ({pauses} time(s) since the last such line)",
                         open=self.open, budget=self.budget, limit=self.limit, pauses=self._pauses)
                self._said_at, self._pauses = now, 0
        return True

    def closed(self) -> None:
        self.open -= 1
        # A little below the budget first, so a flood does not pause and resume every connection.
        if self._paused and self.open < self.budget - max(1, self.budget // 20):
            self._paused = False
            for port in self._ports:
                port.startReading()

    def endpoint(self, endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """``endpoint``, its listening port paused and resumed with the others."""
        return _BudgetedEndpoint(endpoint, self)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self._ports.append(port)
        if self._paused:
            port.stopReading()
        return port


@implementer(IStreamServerEndpoint)
class _BudgetedEndpoint:
    def __init__(self, endpoint: IStreamServerEndpoint, budget: DescriptorBudget) -> None:
        self._endpoint = endpoint
        self._budget = budget

    def listen(self, factory) -> Deferred:
        return self._endpoint.listen(factory).addCallback(self._budget._listening)


def check_limits(budget: DescriptorBudget, smtp: int, pop3: int, hard: int) -> None:
    """At start: the descriptors in force, and a warning when the connection
    limits (0: none) could take more than the budget."""
    log.info("descriptors: {soft} may be open (hard limit {hard}); {budget} of them for client connections",
             soft=budget.limit, hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
             budget=budget.budget)
    if not smtp or not pop3 or smtp + pop3 > budget.budget:
        log.warn("descriptors: concurrencyincoming ({smtp}) and pop3concurrencyincoming ({pop3}) allow more "
                 "clients than the {budget} descriptors left for them ({limit} minus {reserve} kept for the "
                 "server); beyond that, new clients wait in the listen backlog. Raise the hard limit "
                 "(ulimit -Hn, LimitNOFILE=) or lower the limits.", smtp=smtp or "no limit",
                 pop3=pop3 or "no limit", budget=budget.budget, limit=budget.limit, reserve=budget.reserve())
