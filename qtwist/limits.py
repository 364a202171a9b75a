"""Connections at once: tcpserver's ``-c``, the ucspi-tcp limits patch's
MAXCONNIP/MAXCONNC, and Postfix's anvil, for all SMTP listeners together and
for POP3.

A client counts by its address (an IPv6 client by its /64, since one host
easily owns a whole /64) and by its network (an IPv4 /24, an IPv6 /48).
Past a limit the new connection is refused with one line and closed.

At the total limit the server is full, typically of clients that connect and
say nothing.  Then a new connection takes the place of another session,
which gets a 421 and is closed: first the session silent the longest, if
that is at least ``EVICT_IDLE`` seconds; else, so that a few addresses
cannot keep every slot, a session that has not said a word yet from the
address holding the most sessions, when that is at least two more than the
newcomer's.  A session that waits on the server is never dropped, nor one
that talks (a command, a line of its message) unless it fell silent.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol

from qtwist.numbers import decimal

if TYPE_CHECKING:
    from qtwist.control import Settings

# A session silent this long may make room for a new one when the server is full.
EVICT_IDLE = 1.0
# How many of the longest-silent sessions are looked at for one that is not busy.
EVICT_SCAN = 16

TOO_MANY = "too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "too many connections from your address, try again later"
TOO_MANY_FROM_NETWORK = "too many connections from your network, try again later"


class Session(Protocol):
    """What admission needs of a session."""

    last_activity: float  # when it last completed a command or a line of data
    busy: bool  # it waits on the server (a check, the queue): not idle, whatever the time

    def evict(self) -> None:
        """Say goodbye and close: the server is full and this session is idle."""


@dataclass(frozen=True)
class Limits:
    """The limits for one client; None means no limit of that kind."""

    total: int | None
    per_address: int | None
    per_network: int | None


def smtp_limits(env: Mapping[str, str], settings: Settings) -> Limits:
    """concurrencyincoming, then concurrencyperip unless the client's tcp.smtp
    rule sets MAXCONNIP, and MAXCONNC when it sets one.  A rule that sets
    RELAYCLIENT (our own network, as Postfix exempts mynetworks) is exempt
    from the per-address limit unless it also sets MAXCONNIP."""
    per_address = _count(env.get("MAXCONNIP"))
    if per_address is None and "RELAYCLIENT" not in env:
        per_address = settings.concurrencyperip or None
    return Limits(settings.concurrencyincoming or None, per_address, _count(env.get("MAXCONNC")))


def pop3_limits(settings: Settings) -> Limits:
    return Limits(settings.pop3concurrencyincoming or None, settings.pop3concurrencyperip or None, None)


def _count(text: str | None) -> int | None:
    """A MAXCONN* value; anything but a number counts as not set."""
    return None if text is None else decimal(text)


def client_keys(ip: str) -> tuple[str, str]:
    """(address key, network key): the IPv4 address and its /24, or an IPv6 /64
    and its /48.  ``ip`` is normalised (login.client_address); anything that
    is not an IP counts as itself."""
    if ":" not in ip:
        return ip, ip.rpartition(".")[0] + "." if "." in ip else ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip, ip
    return (str(ipaddress.IPv6Network((address, 64), strict=False)),
            str(ipaddress.IPv6Network((address, 48), strict=False)))


class Admission:
    """The sessions of one service (all SMTP listeners, or POP3) and their counts."""

    def __init__(self) -> None:
        # Oldest activity first, over all sessions and per address.
        self._sessions: OrderedDict[Session, tuple[str, str]] = OrderedDict()
        self._by_address: dict[str, OrderedDict[Session, None]] = {}
        self._by_network: Counter[str] = Counter()
        self._talked: set[Session] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def admit(self, session: Session, ip: str, limits: Limits, now: float) -> str | None:
        """Count ``session`` in, or say why not (the reply's text)."""
        address, network = keys = client_keys(ip)
        held = len(self._by_address.get(address, ()))
        if limits.per_address is not None and held >= limits.per_address:
            return TOO_MANY_FROM_ADDRESS
        if limits.per_network is not None and self._by_network[network] >= limits.per_network:
            return TOO_MANY_FROM_NETWORK
        if limits.total is not None and len(self._sessions) >= limits.total and not self._make_room(held, now):
            return TOO_MANY
        self._sessions[session] = keys
        self._by_address.setdefault(address, OrderedDict())[session] = None
        self._by_network[network] += 1
        return None

    def active(self, session: Session) -> None:
        """``session`` talked: it goes to the back of the eviction line."""
        keys = self._sessions.get(session)
        if keys is not None:
            self._sessions.move_to_end(session)
            self._by_address[keys[0]].move_to_end(session)
            self._talked.add(session)

    def release(self, session: Session) -> None:
        """``session`` ended (or was evicted): it no longer counts."""
        keys = self._sessions.pop(session, None)
        if keys is None:
            return
        address, network = keys
        sessions = self._by_address[address]
        del sessions[session]
        if not sessions:
            del self._by_address[address]
        self._by_network[network] -= 1
        if not self._by_network[network]:
            del self._by_network[network]
        self._talked.discard(session)

    def _make_room(self, newcomer_holds: int, now: float) -> bool:
        for position, session in enumerate(self._sessions):
            if position >= EVICT_SCAN or now - session.last_activity < EVICT_IDLE:
                break
            if not session.busy:
                return self._evict(session)
        fullest = max(self._by_address.values(), key=len)
        if len(fullest) >= newcomer_holds + 2:
            for position, session in enumerate(fullest):
                if position >= EVICT_SCAN:
                    break
                if not session.busy and session not in self._talked:
                    return self._evict(session)
        return False

    def _evict(self, session: Session) -> bool:
        self.release(session)
        session.evict()
        return True
