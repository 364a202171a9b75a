"""Failed logins (SMTP AUTH, POP3) counted per client IP.

Each failure is answered later than the one before (up to a few seconds), and
a client IP with ``limit`` failures within ``window`` seconds is refused with a
temporary error for ``block`` seconds.  Only the failing IP pays: a good
password from another address is never slowed.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

MAX_DELAY = 5.0
PRUNE_EVERY = 1000


class FailureThrottle:
    def __init__(self, clock, limits: Callable[[], tuple[int, int, int]]):
        """``limits`` gives (limit, window seconds, block seconds) as now configured."""
        self.clock = clock
        self.limits = limits
        self.failures: dict[str, deque[float]] = {}
        self.blocked_until: dict[str, float] = {}
        self._events = 0

    def blocked(self, ip: str) -> bool:
        until = self.blocked_until.get(ip)
        if until is None:
            return False
        if self.clock.seconds() < until:
            return True
        del self.blocked_until[ip]
        return False

    def failed(self, ip: str) -> float:
        """Record a failure; returns how long to wait before answering it."""
        limit, window, block = self.limits()
        now = self.clock.seconds()
        recent = self.failures.setdefault(ip, deque())
        recent.append(now)
        while recent and recent[0] <= now - window:
            recent.popleft()
        if limit and len(recent) >= limit:
            self.blocked_until[ip] = now + block
            recent.clear()
        self._events += 1
        if self._events % PRUNE_EVERY == 0:
            self._prune(now, window)
        return min(MAX_DELAY, 0.5 * len(recent) + 0.5)

    def succeeded(self, ip: str) -> None:
        self.failures.pop(ip, None)

    def _prune(self, now: float, window: int) -> None:
        """Forget idle addresses so the tables stay as small as the attack."""
        for ip in [ip for ip, times in self.failures.items() if not times or times[-1] <= now - window]:
            del self.failures[ip]
        for ip in [ip for ip, until in self.blocked_until.items() if until <= now]:
            del self.blocked_until[ip]
