"""POP-before-SMTP relay grants: one file per client IP in HOME/open-smtp/.

A successful POP3 login touches the file named after the client's IP; SMTP
lets that IP relay while the file's mtime is younger than
``relaygrantlifetime``.  One file per IP (instead of qmail's shared
open-smtp table rebuilt by a cron job under a lock) means parallel logins
never wait on each other, a grant costs one ``utime`` and a check one
``stat``, and grants survive a restart.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from qtwist.login import normal_ip
from qtwist.periodic import Periodic

if TYPE_CHECKING:
    from qtwist.control import Settings

_log = Logger()

# ':' would make IPv6 names awkward for shells, rsync and some filesystems.
_IPV6_SEPARATOR = "_"


@functools.lru_cache(maxsize=65536)
def grant_name(ip: str) -> str:
    """The file name for ``ip``, canonical (``login.normal_ip``) so every
    spelling of one address shares a file.  Raises ValueError for anything
    that is not an IP address, so no name can leave the directory."""
    return normal_ip(ip).replace(":", _IPV6_SEPARATOR)


def _ip_from_name(name: str) -> str:
    return name.replace(_IPV6_SEPARATOR, ":")


class Grants:
    """The grant files of one home.

    ``clock`` (an ``IReactorTime``) gives the time used to stamp and age
    grants; by default the system clock.
    """

    def __init__(self, home: Path, clock: IReactorTime | None = None) -> None:
        self.directory = Path(home) / "open-smtp"
        self._directory_name = str(self.directory)  # asked for every SMTP connection: no Path work
        self._clock = clock

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def record(self, ip: str) -> None:
        """Grant ``ip`` relaying from now on; cheap enough for the reactor thread."""
        path = self.directory / grant_name(ip)
        # Without a clock, utime's own "now" (nanosecond precision) is the stamp.
        stamp = None if self._clock is None else (self._clock.seconds(),) * 2
        try:
            os.utime(path, stamp)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            if stamp is not None:
                os.utime(path, stamp)

    def is_live(self, ip: str, lifetime: int, now: float | None = None) -> bool:
        """True when ``ip`` logged in by POP3 less than ``lifetime`` seconds ago."""
        try:
            modified = os.stat(f"{self._directory_name}/{grant_name(ip)}").st_mtime
        except (ValueError, OSError):  # not an IP, or no grant: no relaying
            return False
        age = (self._now() if now is None else now) - modified
        return age < lifetime

    def list(self) -> list[tuple[str, float]]:
        """Every grant as (ip, age in seconds), oldest first."""
        now = self._now()
        grants = [(_ip_from_name(name), now - modified) for name, modified in self._files()]
        return sorted(grants, key=lambda grant: -grant[1])

    def clear(self, older: float | None = None) -> int:
        """Remove every grant, or those at least ``older`` seconds old; return how many."""
        threshold = None if older is None else self._now() - older
        removed = 0
        for name, modified in self._files():
            if threshold is not None and modified > threshold:
                continue
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                continue  # cleared by someone else meanwhile
            removed += 1
        return removed

    def expire(self, lifetime: int) -> int:
        """Remove the grants that no longer allow relaying; return how many."""
        return self.clear(older=lifetime)

    def _files(self) -> list[tuple[str, float]]:
        """(file name, mtime) of each grant; files that vanish while listed are skipped."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    files.append((entry.name, entry.stat(follow_symlinks=False).st_mtime))
            except FileNotFoundError:
                continue
        return files


class GrantsCleaner(Periodic):
    """Removes expired grant files every ``interval`` seconds, so open-smtp/ stays small.

    ``settings`` is asked at each run, so a reloaded relaygrantlifetime applies.
    The directory scan runs in a worker thread: it may hold many files.
    """

    def __init__(self, grants: Grants, settings: Callable[[], "Settings"],
                 interval: float = 300.0, clock: IReactorTime | None = None) -> None:
        super().__init__("grants: removing expired open-smtp/ grants", self._expire, interval, clock, now=True)
        self.grants = grants
        self.settings = settings

    def _expire(self) -> Deferred[None]:
        return deferToThread(self.grants.expire, self.settings().relaygrantlifetime).addCallback(self._expired)

    def _expired(self, removed: int) -> None:
        if removed:
            _log.info("grants: {removed} expired relay grant(s) removed", removed=removed)
