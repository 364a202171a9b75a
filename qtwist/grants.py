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
from twisted.python.failure import Failure

from qtwist.login import normal_ip
from qtwist.periodic import Periodic
from qtwist.sqldb import Database, column_number, column_text
from qtwist.users import UserStoreUnavailable

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

    def record(self, ip: str) -> Deferred[None] | None:
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

    def defer(self, function: Callable, *args) -> Deferred:
        """``function(*args)`` (a blocking use of the grants) in a worker thread."""
        return deferToThread(function, *args)

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


def database_down(failure: Failure) -> None:
    """A periodic job met the database down: its own log line said so already."""
    failure.trap(UserStoreUnavailable)


class GrantsCleaner(Periodic):
    """Removes expired grants every ``interval`` seconds, so open-smtp/ (or the
    relay table) stays small.

    ``settings`` is asked at each run, so a reloaded relaygrantlifetime applies.
    The work runs off the reactor thread: the directory may hold many files.
    """

    def __init__(self, grants: Grants | SQLGrants, settings: Callable[[], "Settings"],
                 interval: float = 300.0, clock: IReactorTime | None = None) -> None:
        super().__init__("grants: removing expired relay grants", self._expire, interval, clock, now=True)
        self.grants = grants
        self.settings = settings

    def _expire(self) -> Deferred[None]:
        expiring = self.grants.defer(self.grants.expire, self.settings().relaygrantlifetime)
        return expiring.addCallbacks(self._expired, database_down)

    def _expired(self, removed: int) -> None:
        if removed:
            _log.info("grants: {removed} expired relay grant(s) removed", removed=removed)


class SQLGrants:
    """Grants in vpopmail's ``relay`` table (``ip_addr``, ``timestamp``), one
    row per IP refreshed at each login, so every node on the database honours
    a login on any of them.

    SMTP asks at every connection and cannot wait on a database, so each node
    keeps the rows in memory: ``refresh`` (every REFRESH seconds) reads those
    stamped since its last look, and every FULL_REFRESH seconds all live
    ones, which also forgets rows removed elsewhere (``qtwist relay clear``).
    While the database is down no one relays by grant: fail closed.
    Timestamps go to the database as text, which an INT, a bigint or 5.4's
    char(12) column all take and compare alike.
    """

    REFRESH = 0.5
    FULL_REFRESH = 30.0

    def __init__(self, database: Database, clock: IReactorTime | None = None) -> None:
        self.database = database
        self._clock = clock
        self._stamps: dict[str, int] = {}
        self._newest = 0
        self._full_at = 0.0
        self._table_made = False

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _quote(self, name: str) -> str:
        return self.database.dialect.quote(name)

    def record(self, ip: str) -> Deferred[None]:
        """Grant ``ip`` relaying: at once on this node, within REFRESH on the others."""
        name = normal_ip(ip)
        now = int(self._now())
        self._stamps[name] = now
        return self.database.defer(self.database.run, self._write, name, now)

    def _write(self, cursor, ip: str, now: int) -> None:
        if not self._table_made:
            # vpopmail makes the table on first use too.
            self.database.dialect.create_table(cursor, "relay", f"ip_addr VARCHAR(39) NOT NULL, "
                                               f"{self._quote('timestamp')} BIGINT DEFAULT 0 NOT NULL, "
                                               "PRIMARY KEY (ip_addr)")
            self._table_made = True
        self.database.dialect.upsert(cursor, "relay", {"ip_addr": ip}, {"timestamp": str(now)})

    def is_live(self, ip: str, lifetime: int, now: float | None = None) -> bool:
        """True when ``ip`` logged in by POP3 on any node less than ``lifetime`` seconds ago."""
        if self.database.down:
            return False
        try:
            stamp = self._stamps.get(normal_ip(ip))
        except ValueError:
            return False
        return stamp is not None and (self._now() if now is None else now) - stamp < lifetime

    def refresh(self, lifetime: int) -> Deferred[None]:
        """Read what changed in the table (all live rows now and then)."""
        now = self._now()
        full = now >= self._full_at
        since = int(now) - lifetime if full else self._newest - 1
        reading = self.database.defer(self.database.run, self._read, since)
        reading.addCallback(self._read_done, full, now)
        return reading.addErrback(database_down)

    def defer(self, function: Callable, *args) -> Deferred:
        return self.database.defer(function, *args)

    def _read(self, cursor, since: int) -> list[tuple[str, int]]:
        try:
            cursor.execute(f"SELECT ip_addr, {self._quote('timestamp')} FROM {self._quote('relay')} "
                           f"WHERE {self._quote('timestamp')} >= %s", (str(since),))
        except Exception as error:
            if self.database.dialect.is_missing_table(error):
                return []  # no one has logged in yet
            raise
        return [(column_text(ip), column_number(stamp)) for ip, stamp in cursor.fetchall()]

    def _read_done(self, rows: list[tuple[str, int]], full: bool, now: float) -> None:
        stamps = {} if full else self._stamps
        for ip, stamp in rows:
            try:
                ip = normal_ip(ip)
            except ValueError:
                continue  # not an address: no one can connect from it
            if stamp > stamps.get(ip, 0):
                stamps[ip] = stamp
            self._newest = max(self._newest, stamp)
        if full:
            # Logins of this node not yet in what was read stay.
            for ip, stamp in self._stamps.items():
                if stamp > stamps.get(ip, 0) and stamp >= self._newest - 1:
                    stamps[ip] = stamp
            self._stamps = stamps
            self._full_at = now + self.FULL_REFRESH

    # -- blocking, for the qtwist command and the cleaner --------------------------------------------

    def list(self) -> list[tuple[str, float]]:
        """Every grant as (ip, age in seconds), oldest first."""
        now = self._now()
        rows = self.database.run(self._read, 0)
        return sorted(((ip, now - stamp) for ip, stamp in rows), key=lambda grant: -grant[1])

    def clear(self, older: float | None = None) -> int:
        """Remove every grant, or those at least ``older`` seconds old; return how many."""
        def delete(cursor) -> int:
            query, params = f"DELETE FROM {self._quote('relay')}", ()
            if older is not None:
                query += f" WHERE {self._quote('timestamp')} <= %s"
                params = (str(int(self._now() - older)),)
            try:
                cursor.execute(query, params)
            except Exception as error:
                if self.database.dialect.is_missing_table(error):
                    return 0
                raise
            return max(0, cursor.rowcount)
        return self.database.run(delete)

    def expire(self, lifetime: int) -> int:
        """Remove the grants that no longer allow relaying (any node may: the same rows go)."""
        return self.clear(older=lifetime)
