"""Logging in, for SMTP AUTH and POP3 alike: qmail's checkpassword step.

Both protocols come through here, so they cannot drift apart: the same
client address (an IPv4-mapped IPv6 peer is its IPv4 address), the same cred
portal over the user store, the same failed-login throttle per address, and
one policy when the user store cannot answer (a temporary failure, counted
nowhere: a database outage must neither let anyone in nor lock anyone out).
The protocols only turn a ``LoginResult`` into their own reply.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import Interface, implementer

from qtwist.users import IUserStore, User, UserStoreUnavailable

log = Logger(namespace="qtwist.login")

# The client address of a connection that has none (a UNIX socket): such
# clients share one throttle entry and get no relay grant.
NO_IP = "unknown"


# -- client addresses -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def normal_ip(text: str) -> str:
    """One spelling per address, as every table keys it (tcp.smtp, grants, the
    throttle): an IPv4-mapped IPv6 address is the IPv4 one, IPv6 is compressed,
    a scope (``%eth0``) is dropped.  Raises ValueError for text that is no IP.
    Cached: parsing costs more than the rest of accepting a connection, and
    clients come back."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


def ip_literal(host: str, *, bare: bool) -> str | None:
    """The normal address in ``[1.2.3.4]`` / ``[IPv6:::1]`` (or a bare address when ``bare``)."""
    if host.startswith("[") and host.endswith("]"):
        text = host[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    elif bare:
        text = host
    else:
        return None
    try:
        return normal_ip(text)
    except ValueError:
        return None


def client_address(transport: object) -> str:
    """The connected client's IP, normalised; NO_IP when the transport has none."""
    host = getattr(transport.getPeer(), "host", None)  # type: ignore[attr-defined]
    if not isinstance(host, str):
        return NO_IP
    try:
        return normal_ip(host)
    except ValueError:
        return NO_IP


# -- failed logins --------------------------------------------------------------------------------

MAX_DELAY = 5.0
PRUNE_EVERY = 1000


class FailureThrottle:
    """Failed logins counted per client address.

    Each failure is answered later than the one before (up to a few seconds),
    and an address with ``limit`` failures within ``window`` seconds is refused
    with a temporary error for ``block`` seconds.  Only the failing address
    pays: a good password from another address is never slowed.
    """

    def __init__(self, clock: IReactorTime, limits: Callable[[], tuple[int, int, int]]):
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


# -- credentials and the cred portal --------------------------------------------------------------

class IMailUser(Interface):
    """The avatar of a logged-in mailbox user: the store's User."""


class PlainCredentials(UsernamePassword):
    """A password login that may name whom it acts for (SASL PLAIN's authzid,
    RFC 4616); a mailbox may only act as itself."""

    def __init__(self, username: bytes, password: bytes, authzid: bytes = b"") -> None:
        super().__init__(username, password)
        self.authzid = authzid

    def acts_as_itself(self) -> bool:
        return not self.authzid or self.authzid.lower() == self.username.lower()


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """An APOP answer (RFC 1939 §7): the MD5 hex digest of the greeting's timestamp
    followed by the clear-text password.

    Twisted's ``pop3.APOPCredentials`` compares str with bytes and never matches.
    """

    def __init__(self, username: bytes, timestamp: bytes, digest: bytes) -> None:
        self.username = username
        self.timestamp = timestamp
        self.digest = digest

    def checkPassword(self, password: bytes) -> bool:
        expected = hashlib.md5(self.timestamp + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())


@implementer(ICredentialsChecker)
class StoreChecker:
    """Checks credentials against the user store for one service ('smtp' or 'pop3').

    Passwords (PLAIN, LOGIN, USER/PASS) are verified against the stored hash
    in a worker thread, since sha512-crypt and bcrypt cost milliseconds and a
    store may wait on the network; challenge mechanisms (CRAM-MD5, APOP) need
    the clear-text field.  A user whose flags forbid the service is refused
    like a wrong password.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, users: IUserStore, service: str):
        self.users = users
        self.service = service

    def requestAvatarId(self, credentials) -> Deferred:
        if isinstance(credentials, PlainCredentials) and not credentials.acts_as_itself():
            return fail(UnauthorizedLogin())
        address = _text(credentials.username)
        if IUsernamePassword.providedBy(credentials):
            checked = self.users.defer(self.users.authenticate, address, _text(credentials.password))
        else:
            checked = self.users.defer(self._challenge_answered, address, credentials)
        return checked.addCallback(self._allowed)

    def _challenge_answered(self, address: str, credentials) -> User | None:
        """The user when a CRAM-MD5 or APOP answer matches the clear-text field."""
        user = self.users.lookup(address)
        secret = user.cleartext if user is not None else ""
        if secret and credentials.checkPassword(secret.encode("utf-8", "surrogateescape")):
            return user
        return None

    def _allowed(self, user: User | None) -> User:
        permitted = user is not None and (user.may_smtp if self.service == "smtp" else user.may_pop)
        if not permitted:
            raise UnauthorizedLogin()
        return user


@implementer(IRealm)
class MailRealm:
    """Hands out the User the checker found."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMailUser not in interfaces:
            raise NotImplementedError("qtwist only knows mail users")
        return IMailUser, avatarId, lambda: None


def mail_portal(users: IUserStore, service: str) -> Portal:
    return Portal(MailRealm(), [StoreChecker(users, service)])


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


# -- the flow -------------------------------------------------------------------------------------

class Refusal(enum.Enum):
    """Why a login did not succeed."""

    WRONG = "wrong credentials"  # counted, and answered late
    BLOCKED = "too many failures"  # the address failed too often lately: not even checked
    UNAVAILABLE = "cannot check now"  # the user store failed: temporary, counted nowhere


@dataclass(frozen=True)
class LoginResult:
    user: User | None = None
    refusal: Refusal | None = None


class Logins:
    """The one way in for one service: its portal and the shared throttle."""

    def __init__(self, service: str, portal: Portal, throttle: FailureThrottle, clock: IReactorTime,
                 users: IUserStore | None = None) -> None:
        """``users``, when given, notes each successful login (vpopmail's lastauth)."""
        self.service = service
        self.portal = portal
        self.users = users
        self.throttle = throttle
        self.clock = clock

    def blocked(self, ip: str) -> bool:
        """Whether ``ip`` failed too often lately (asked before a challenge is even sent)."""
        return self.throttle.blocked(ip)

    async def login(self, credentials: ICredentials, ip: str, method: str) -> LoginResult:
        """Check ``credentials`` from ``ip``.  A failure is answered only after
        the throttle's delay, so guessing stays slow."""
        name = _printable(_text(getattr(credentials, "username", b"")))
        if self.throttle.blocked(ip):
            log.info("{service}: {method} login refused for {name!r} from {ip}: too many failures",
                     service=self.service, method=method, name=name, ip=ip)
            return LoginResult(refusal=Refusal.BLOCKED)
        try:
            _, user, _ = await self.portal.login(credentials, None, IMailUser)
        except UserStoreUnavailable:
            # Said once by the store when the outage began; no line per client.
            return LoginResult(refusal=Refusal.UNAVAILABLE)
        except UnauthorizedLogin:
            log.info("{service}: {method} login failed for {name!r} from {ip}", service=self.service,
                     method=method, name=name, ip=ip)
            await deferLater(self.clock, self.throttle.failed(ip), lambda: None)
            return LoginResult(refusal=Refusal.WRONG)
        except Exception:
            log.failure("{service}: {method} login of {name!r} could not be checked", service=self.service,
                        method=method, name=name)
            return LoginResult(refusal=Refusal.UNAVAILABLE)
        self.throttle.succeeded(ip)
        noted = self.users.logged_in(user, ip) if self.users is not None else None
        if noted is not None:
            noted.addErrback(self._not_noted, user)
        log.info("{service}: {method} login ok {user} from {ip}", service=self.service, method=method,
                 user=user.address, ip=ip)
        return LoginResult(user=user)

    def _not_noted(self, failure, user: User) -> None:
        if not failure.check(UserStoreUnavailable):
            log.failure("{service}: cannot note the login of {user}", failure, service=self.service,
                        user=user.address)


def _printable(text: str) -> str:
    """Client text fit for one log line, and not too much of it."""
    return "".join(char if char.isprintable() else "?" for char in text[:100])
