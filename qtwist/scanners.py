"""The content scanners' daemons, as simscan talks to them: SpamAssassin's
spamd (the spamc protocol, SYMBOLS: the score, the threshold and the rules
that hit) and ClamAV's clamd (INSTREAM), over TCP or a unix socket, one
connection per message, never blocking the reactor.

An address is ``HOST:PORT`` (``[::1]:783`` for IPv6) or the path of a unix
socket.  Anything but a well-formed answer is a ScanError: the plugins
decide whether that means 451 or fail-open.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from qtwist.numbers import decimal

# clamd's INSTREAM takes the data in chunks, each behind its length.
CHUNK = 64 * 1024
# No daemon says more than this about one message.
MOST_REPLY = 256 * 1024

_SPAM_HEADER = re.compile(rb"^Spam:\s*(True|False|Yes|No)\s*;\s*(-?[0-9.]+)\s*/\s*(-?[0-9.]+)\s*$",
                          re.IGNORECASE | re.MULTILINE)


class ScanError(Exception):
    """The daemon could not be reached, or answered something else than a verdict."""


class TooLarge(ScanError):
    """clamd would not take the whole message (its StreamMaxLength)."""


@dataclass(frozen=True)
class SpamVerdict:
    spam: bool
    score: float
    threshold: float
    tests: tuple[str, ...]


def endpoint_for(reactor, address: str, timeout: float) -> IStreamClientEndpoint:
    if address.startswith("/"):
        return UNIXClientEndpoint(reactor, address, timeout=timeout)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    number = decimal(port)
    if not host or number is None or not 0 < number < 65536:
        raise ScanError(f"{address!r} is neither HOST:PORT nor the path of a unix socket")
    # An address needs no look-up (HostnameEndpoint's costs a thread hop a message).
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, number, timeout=timeout)
    endpoint = TCP4ClientEndpoint if literal.version == 4 else TCP6ClientEndpoint
    return endpoint(reactor, host, number, timeout=timeout)


class _Exchange(Protocol):
    """Sends one request and keeps what comes back until the daemon closes."""

    def __init__(self, request: bytes | list[bytes]) -> None:
        self.request = request
        self.received: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.writeSequence(self.request if isinstance(self.request, list) else [self.request])

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MOST_REPLY:
            self.transport.abortConnection()
            return
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.size > MOST_REPLY:
            self.done.errback(ScanError("the answer is too long"))
        else:
            self.done.callback(b"".join(self.received))


async def _exchange(reactor, address: str, request: bytes | list[bytes], timeout: float) -> bytes:
    protocol = _Exchange(request)
    # (connectProtocol would define a factory class for every message.)
    connecting = endpoint_for(reactor, address, timeout).connect(Factory.forProtocol(lambda: protocol))
    try:
        await connecting
    except Exception as error:
        raise ScanError(f"cannot connect to {address}: {error}") from None
    answer = protocol.done.addTimeout(timeout, reactor)
    try:
        return await answer
    except ScanError:
        raise
    except Exception as error:
        protocol.transport.abortConnection()
        raise ScanError(f"no answer from {address} within {timeout:g} s: {error!r}") from None


async def spamd_check(reactor, address: str, message: bytes, timeout: float) -> SpamVerdict:
    """spamd's verdict on ``message``."""
    head = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(message)
    answer = await _exchange(reactor, address, [head, message], timeout)
    status, _, rest = answer.partition(b"\r\n")
    words = status.split()
    if len(words) < 3 or not words[0].startswith(b"SPAMD/") or words[1] != b"0":
        raise ScanError(f"spamd answered {status[:80]!r}")
    headers, _, body = rest.partition(b"\r\n\r\n")
    found = _SPAM_HEADER.search(headers)
    if found is None:
        raise ScanError("spamd's answer has no Spam: line")
    tests = tuple(name for name in body.decode("ascii", "replace").strip().split(",") if name)
    return SpamVerdict(found.group(1).lower() in (b"true", b"yes"), float(found.group(2)), float(found.group(3)),
                       tests)


async def clamd_scan(reactor, address: str, message: bytes, timeout: float) -> str | None:
    """The name of the virus clamd finds in ``message``, or None."""
    request = [b"zINSTREAM\0"]
    for start in range(0, len(message), CHUNK):
        chunk = message[start:start + CHUNK]
        request += [struct.pack(">I", len(chunk)), chunk]
    request.append(struct.pack(">I", 0))
    answer = (await _exchange(reactor, address, request, timeout)).rstrip(b"\0\r\n").decode("utf-8", "replace")
    verdict = answer.partition(": ")[2]
    if verdict == "OK":
        return None
    if verdict.endswith(" FOUND"):
        return verdict[:-len(" FOUND")]
    if "size limit exceeded" in answer:
        raise TooLarge(f"clamd's stream limit is below {len(message)} bytes")
    raise ScanError(f"clamd answered {answer[:120]!r}")
