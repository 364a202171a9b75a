"""qmail-remote's job: find where a domain's mail goes and hand it over by SMTP.

One call to :meth:`RemoteDelivery.deliver` is one qmail-remote run widened to
all recipients of one domain: route (smtproutes, else MX, else A/AAAA), connect
(skipping hosts that keep timing out, as qmail's tcpto does), then one SMTP
transaction.  Every outcome text is qmail-remote's report, lines separated by
``\\n`` as qmail-remote writes them (qmail-send's log shows them as ``/``).
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from OpenSSL import SSL
from twisted.internet import error, threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from qtwist.delivery import IRemoteDelivery, Kind, Outcome
from qtwist.login import ip_literal, normal_ip
from qtwist.resolver import Lookups

if TYPE_CHECKING:
    from qtwist.control import Settings

_log = Logger()

NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
DNS_TEMPORARY = "Sorry, I couldn't find any host by that name. (#4.1.2)"
NO_MAIL_EXCHANGER = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)"
UNSENDABLE_SENDER = "Sorry, the envelope sender has characters SMTP cannot carry. (#5.1.7)"
UNSENDABLE_RECIPIENT = "Sorry, that address has characters SMTP cannot carry. (#5.1.3)"
AMBIGUOUS_MX = (
    "Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
    "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)"
)

# qmail-remote keeps at most this much of a reply's text for its report.
_MAX_REPLY_TEXT = 5000
# The message goes out in pieces of about this size, so it is never copied whole.
_CHUNK = 65536
# qmail's tcpto: a host that timed out twice in a row is skipped for about an hour.
_TCPTO_STRIKES = 2
_TCPTO_SECONDS = 3600.0
_RANK: dict[Kind, int] = {"success": 1, "deferral": 0, "failure": -1}
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")


class _Verdict(Exception):
    """Ends a delivery before any SMTP conversation, with one status for every recipient."""

    def __init__(self, kind: Kind, text: str, unreachable: bool = False) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.unreachable = unreachable


class ConnectionDied(Exception):
    """The SMTP connection closed, broke the protocol or timed out mid-conversation."""

    def __init__(self, reason: Failure | None) -> None:
        super().__init__(_why(reason))


def _why(reason: Failure | None) -> str:
    """A short reason for a report: OpenSSL's error strings, or Twisted's message."""
    if reason is None:
        return "connection lost"
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        return ", ".join(str(entry[-1]) for entry in value.args[0]) or "TLS error"
    return str(value).rstrip(".")


# -- which addresses are this host ------------------------------------------------

def this_host_addresses() -> set[str]:
    """Addresses configured on this machine's interfaces, for the MX self-check.

    Read from /proc/net/fib_trie (IPv4 ``/32 host LOCAL`` entries, so 127.0.0.2 is
    not "this host" unless an interface has it) and /proc/net/if_inet6; without
    /proc, the addresses of our host name plus 127.0.0.1 and ::1.  No subprocess.
    """
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as trie:
            leaf = ""
            for line in trie:
                entry = line.strip()
                if entry.startswith("|-- "):
                    leaf = entry[4:]
                elif entry == "/32 host LOCAL" and leaf:
                    found.add(leaf)
    except OSError:
        found = {"127.0.0.1", "::1"}
        try:
            for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
                found.add(str(sockaddr[0]).split("%")[0])
        except OSError:
            pass
        return {normal_ip(a) for a in found}
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as inet6:
            for line in inet6:
                found.add(str(ipaddress.IPv6Address(int(line.split()[0], 16))))
    except OSError:
        pass
    return found


# -- qmail's tcpto --------------------------------------------------------------

class ConnectTimeouts:
    """In-memory tcpto: remember hosts whose connects timed out, to stop waiting on them."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._strikes: dict[str, tuple[int, float]] = {}

    def should_skip(self, address: str) -> bool:
        strikes, when = self._strikes.get(address, (0, 0.0))
        return strikes >= _TCPTO_STRIKES and self._clock.seconds() - when < _TCPTO_SECONDS

    def record(self, address: str, *, timed_out: bool) -> None:
        """A timeout adds a strike; anything else (connected, refused) clears them."""
        if timed_out:
            strikes, _ = self._strikes.get(address, (0, 0.0))
            self._strikes[address] = (strikes + 1, self._clock.seconds())
        else:
            self._strikes.pop(address, None)


# -- routing ------------------------------------------------------------------

def _printable(name: str) -> str:
    """qmail's outsafe: a host name in a report never carries control bytes."""
    return "".join(ch if 33 <= ord(ch) <= 126 else "?" for ch in name)


def _no_such_host(name: str) -> _Verdict:
    return _Verdict("failure", f"Sorry, I couldn't find any host named {_printable(name)}. (#5.1.2)")


def _addresses_of(resolver: dns.resolver.Resolver, host: dns.name.Name) -> tuple[list[str], bool]:
    """A then AAAA addresses of ``host``, and whether a look-up failed only for now.

    NXDOMAIN propagates: only the caller knows whether it is fatal."""
    addresses: list[str] = []
    soft = False
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = resolver.resolve(host, rdtype, search=False)
        except dns.resolver.NoAnswer:
            continue
        except dns.resolver.NXDOMAIN:
            raise
        except dns.exception.DNSException:
            soft = True
            continue
        addresses.extend(normal_ip(record.address) for record in answer)
    return addresses, soft


def _mail_hosts(resolver: dns.resolver.Resolver, domain: dns.name.Name) -> list[tuple[int, dns.name.Name]]:
    """MX hosts in preference order, shuffled among equals; the domain itself without MX."""
    try:
        answer = resolver.resolve(domain, dns.rdatatype.MX, search=False)
    except dns.resolver.NoAnswer:
        return [(0, domain)]
    records = list(answer)
    usable = [record for record in records if record.exchange != dns.name.root]
    if records and not usable:
        raise _Verdict(
            "failure",
            f"Sorry, {_printable(domain.to_text(omit_final_dot=True))} does not accept mail: "
            "it publishes a null MX. (#5.1.10)",
        )
    random.shuffle(usable)
    usable.sort(key=lambda record: record.preference)
    return [(record.preference, record.exchange) for record in usable]


def _drop_self(targets: list[tuple[int, str]], mine: set[str]) -> list[str]:
    """qmail's prefme rule: when an MX is this host, use only strictly better MXes."""
    own = {normal_ip(address) for address in mine}
    best_self = min((pref for pref, address in targets if address in own), default=None)
    kept = [address for pref, address in targets if best_self is None or pref < best_self]
    if not kept:
        raise _Verdict("failure", AMBIGUOUS_MX)
    return list(dict.fromkeys(kept))


def _plan(
    make_resolver: Callable[[], dns.resolver.Resolver],
    name: str,
    use_mx: bool,
    local_addresses: Callable[[], set[str]],
) -> list[str]:
    """Addresses to try for ``name``, best first.  Blocking: runs in a worker thread.

    ``use_mx`` is qmail's dns_mxip (a recipient domain, with the self-check);
    otherwise dns_ip (an smtproutes relay host, taken as configured)."""
    literal = ip_literal(name, bare=not use_mx)
    if literal is not None:
        return _drop_self([(0, literal)], local_addresses()) if use_mx else [literal]
    try:
        qname = dns.name.from_text(name)
    except dns.exception.DNSException:
        raise _no_such_host(name) from None
    try:
        resolver = make_resolver()
        hosts = _mail_hosts(resolver, qname) if use_mx else [(0, qname)]
        targets: list[tuple[int, str]] = []
        soft = False
        for preference, host in hosts:
            try:
                addresses, host_soft = _addresses_of(resolver, host)
            except dns.resolver.NXDOMAIN:
                if host == qname:
                    raise
                continue  # a dangling MX host: the others may still work
            soft = soft or host_soft
            targets.extend((preference, address) for address in addresses)
    except dns.resolver.NXDOMAIN:
        raise _no_such_host(name) from None
    except dns.exception.DNSException:
        raise _Verdict("deferral", DNS_TEMPORARY) from None
    if not targets:
        raise _Verdict("deferral", DNS_TEMPORARY) if soft else _Verdict("failure", NO_MAIL_EXCHANGER)
    if use_mx:
        return _drop_self(targets, local_addresses())
    return list(dict.fromkeys(address for _, address in targets))


# -- the SMTP connection --------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """One SMTP reply: its code and its lines as received (CR dropped, NUL made '?')."""

    code: int
    lines: tuple[str, ...]

    def said(self) -> str:
        return "Remote host said: " + "\n".join(self.lines)


@implementer(IHandshakeListener)
class SMTPConnection(LineReceiver, TimeoutMixin):
    """The client side of one SMTP connection: replies queue up in order, so a
    conversation is written as ``send`` then ``await read_reply()``, pipelined or not.
    Silence (nothing read, nothing written) for ``timeout`` seconds drops it."""

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, reactor: IReactorTime, timeout: float) -> None:
        self.callLater = reactor.callLater
        self._timeout_seconds = timeout
        self._replies: deque[Reply] = deque()
        self._waiting: deque[Deferred[Reply]] = deque()
        self._lines: list[str] = []
        self._text_size = 0
        self._lost: Failure | None = None
        self._handshake: Deferred[None] | None = None
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.setTimeout(self._timeout_seconds)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._lost is not None or self.transport.disconnecting:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) < 3 or not line[:3].isdigit():
            self._lost = Failure(error.ConnectionLost("the server's reply is not SMTP"))
            self.transport.abortConnection()
            return
        text = line.decode("utf-8", errors="replace").replace("\0", "?")
        if self._text_size < _MAX_REPLY_TEXT:
            self._lines.append(text[: _MAX_REPLY_TEXT - self._text_size])
            self._text_size += len(text)
        if line[3:4] == b"-":
            return
        reply = Reply(int(line[:3]), tuple(self._lines))
        self._lines = []
        self._text_size = 0
        if self._waiting:
            self._waiting.popleft().callback(reply)
        else:
            self._replies.append(reply)

    def read_reply(self) -> Deferred[Reply]:
        if self._replies:
            return succeed(self._replies.popleft())
        if self._lost is not None:
            return fail(ConnectionDied(self._lost))
        waiting: Deferred[Reply] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def send(self, *commands: str) -> None:
        self.resetTimeout()
        self.transport.write(b"".join(command.encode("utf-8", "surrogateescape") + b"\r\n"
                                      for command in commands))

    def start_tls(self, context_factory: object) -> Deferred[None]:
        """Switch to TLS; the Deferred fires when the handshake is done, fails if it fails.

        Bytes that arrived after the 220 but before the handshake were not protected
        by TLS and could be injected replies, so they end the connection instead."""
        self._handshake = Deferred()
        if self.clearLineBuffer() or self._replies or self._lines:
            self._lost = Failure(error.ConnectionLost("the server sent data before the TLS handshake"))
            self.transport.abortConnection()
        else:
            self.transport.startTLS(context_factory)
        return self._handshake

    def handshakeCompleted(self) -> None:
        if self._handshake is not None and not self._handshake.called:
            self._handshake.callback(None)

    def send_message(self, message: bytes) -> Deferred[None]:
        """Stream ``message`` (LF line ends) in wire form, then the final dot."""
        return _MessageStream(self, message).start()

    def quit(self) -> Deferred[None]:
        """QUIT without waiting for the answer, as qmail-remote does; fires once closed."""
        if self._lost is None and not self.transport.disconnecting:
            self.send("QUIT")
            self.transport.loseConnection()
        return self.closed

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._lost is None:
            self._lost = reason
        while self._waiting:
            self._waiting.popleft().errback(ConnectionDied(self._lost))
        if self._handshake is not None and not self._handshake.called:
            self._handshake.errback(ConnectionDied(self._lost))
        self.closed.callback(None)


def wire_form(piece: bytes) -> bytes:
    """RFC 5321 form of ``piece``, which starts at a line start: CRLF line ends and
    a '.' doubled at the start of each line; a partial last line is completed."""
    stuffed = piece.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    stuffed = stuffed.replace(b"\n", b"\r\n")
    return stuffed if stuffed.endswith(b"\r\n") or not stuffed else stuffed + b"\r\n"


@implementer(IPushProducer)
class _MessageStream:
    """Writes the message piece by piece whenever the transport has room, so the
    wire form of a large message never exists whole in memory."""

    def __init__(self, connection: SMTPConnection, message: bytes) -> None:
        self._connection = connection
        self._transport = connection.transport
        self._message = message
        self._offset = 0
        self._paused = False
        self._pumping = False
        self._done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._transport.registerProducer(self, True)
        self._pump()
        return self._done

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self._done.called:
                if self._offset >= len(self._message):
                    self._transport.unregisterProducer()
                    self._transport.write(b".\r\n")
                    self._done.callback(None)
                    return
                end = self._message.find(b"\n", self._offset + _CHUNK - 1)
                end = len(self._message) if end < 0 else end + 1
                piece = self._message[self._offset:end]
                self._offset = end
                self._connection.resetTimeout()
                self._transport.write(wire_form(piece))
        finally:
            self._pumping = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._paused = True
        if not self._done.called:
            self._done.errback(ConnectionDied(None))


def _sendable(address: str) -> bool:
    """No control characters: SMTP has no way to carry them, and a CR or LF would
    end the command early and let the address inject one of its own."""
    return not any(ord(ch) < 32 or ord(ch) == 127 for ch in address)


def smtp_address(address: str) -> str:
    """``<address>`` for MAIL/RCPT, quoting the local part where SMTP needs it
    (qmail-remote's addrmangle: queue addresses are stored unquoted)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return f"<{address}>"
    plain = (
        local
        and not local.startswith(".")
        and not local.endswith(".")
        and ".." not in local
        and all(ch in _ATEXT or ch == "." or ord(ch) > 127 for ch in local)
    )
    if not plain:
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"<{local}@{domain}>"


# -- one SMTP transaction -------------------------------------------------------

Status = tuple[Kind, str]


def _by_code(code: int) -> Kind:
    return "failure" if code >= 500 else "deferral"


def _report(own: Status | None, message: Status) -> Outcome:
    """qmail-rspawn's rule: a recipient's own RCPT status wins; the message status
    applies to accepted recipients and is appended when it is no better."""
    if own is None:
        return Outcome(message[0], message[1])
    kind, text = own
    if _RANK[message[0]] <= _RANK[kind]:
        text = f"{text}\n{message[1]}"
    return Outcome(kind, text)


class _Transaction:
    """One conversation with one connected host, in qmail-remote's order."""

    def __init__(
        self,
        connection: SMTPConnection,
        address: str,
        helohost: str,
        tls_context_factory: object | None,
        sender: str,
        recipients: list[str],
        message: bytes,
    ) -> None:
        self._conn = connection
        self._ip = address
        self._helohost = helohost
        self._tls = tls_context_factory
        self._sender = sender
        self._recipients = recipients
        self._message = message
        self._own: list[Status | None] = [None] * len(recipients)
        self._critical = False

    async def run(self) -> list[Outcome]:
        try:
            status = await self._talk()
        except ConnectionDied:
            duplicate = "Possible duplicate! " if self._critical else ""
            status = ("deferral", f"Connected to {self._ip} but connection died. {duplicate}(#4.4.2)")
        await self._conn.quit()
        return [_report(own, status) for own in self._own]

    async def _command(self, command: str) -> Reply:
        self._conn.send(command)
        return await self._conn.read_reply()

    async def _ehlo(self) -> set[str] | None:
        """The EHLO keywords (upper case, ``AUTH=`` taken as ``AUTH``), None if refused."""
        reply = await self._command(f"EHLO {self._helohost}")
        if reply.code != 250:
            return None
        return {line[4:].replace("=", " ").split(" ")[0].upper() for line in reply.lines[1:]}

    async def _talk(self) -> Status:
        ip = self._ip
        greeting = await self._conn.read_reply()
        if greeting.code // 100 != 2:
            return _by_code(greeting.code), f"Connected to {ip} but greeting failed.\n{greeting.said()}"
        extensions = await self._ehlo()
        if extensions is not None and "STARTTLS" in extensions and self._tls is not None:
            # A host that offers TLS gets the message encrypted or not at all: a
            # refused STARTTLS or a failed handshake defers, never goes on in plaintext.
            reply = await self._command("STARTTLS")
            if reply.code != 220:
                return "deferral", f"TLS connect failed: STARTTLS was refused; connected to {ip}.\n{reply.said()}"
            try:
                await self._conn.start_tls(self._tls)
            except ConnectionDied as died:
                return "deferral", f"TLS connect failed: {died}; connected to {ip}."
            extensions = await self._ehlo()
        if extensions is None:
            helo = await self._command(f"HELO {self._helohost}")
            if helo.code // 100 != 2:
                return "deferral", f"Connected to {ip} but my name was rejected.\n{helo.said()}"
            extensions = set()
        return await self._envelope_and_data(extensions)

    async def _envelope_and_data(self, extensions: set[str]) -> Status:
        ip = self._ip
        mail = f"MAIL FROM:{smtp_address(self._sender) if self._sender else '<>'}"
        if "SIZE" in extensions:
            wire_size = len(self._message) + self._message.count(b"\n")  # LF becomes CRLF
            mail += f" SIZE={wire_size}"
        if "8BITMIME" in extensions and not self._message.isascii():
            mail += " BODY=8BITMIME"
        rcpts = [f"RCPT TO:{smtp_address(recipient)}" for recipient in self._recipients]
        pipelined = "PIPELINING" in extensions
        if pipelined:
            self._conn.send(mail, *rcpts)
        else:
            self._conn.send(mail)
        reply = await self._conn.read_reply()
        if reply.code // 100 != 2:
            return _by_code(reply.code), f"Connected to {ip} but sender was rejected.\n{reply.said()}"
        accepted = 0
        for index, rcpt in enumerate(rcpts):
            reply = await (self._conn.read_reply() if pipelined else self._command(rcpt))
            if reply.code // 100 == 2:
                accepted += 1
            else:
                self._own[index] = (_by_code(reply.code), f"{ip} does not like recipient.\n{reply.said()}")
        if not accepted:
            return "failure", f"Giving up on {ip}."
        reply = await self._command("DATA")
        if reply.code // 100 != 3:
            kind = "failure" if reply.code >= 500 else "deferral"
            return kind, f"{ip} failed on DATA command.\n{reply.said()}"
        await self._conn.send_message(self._message)
        self._critical = True
        reply = await self._conn.read_reply()
        self._critical = False
        if reply.code // 100 == 2:
            return "success", f"{ip} accepted message.\n{reply.said()}"
        return _by_code(reply.code), f"{ip} failed after I sent the message.\n{reply.said()}"


# -- the public face ------------------------------------------------------------

def opportunistic_tls() -> CertificateOptions:
    """A client TLS context that does not verify the server, as qmail's TLS patch
    does without control/tlshosts: encryption against passive eavesdropping only."""
    return CertificateOptions()


@implementer(IRemoteDelivery)
class RemoteDelivery:
    """qmail-remote for the whole process: ``deliver`` once per (message, domain).

    ``reactor`` must offer TCP, time and a thread pool (DNS look-ups through
    ``lookups`` and ``local_addresses`` run in that pool, never on the reactor
    thread).
    ``tls_context_factory`` (e.g. :func:`opportunistic_tls`) enables STARTTLS."""

    def __init__(
        self,
        reactor: Any,
        *,
        lookups: Lookups,
        remote_port: int = 25,
        local_addresses: Callable[[], set[str]] | None = None,
        tls_context_factory: object | None = None,
    ) -> None:
        self._reactor = reactor
        self._lookups = lookups
        self._remote_port = remote_port
        self._local_addresses = local_addresses or this_host_addresses
        self._tls = tls_context_factory
        self._timeouts = ConnectTimeouts(reactor)

    def deliver(
        self, settings: Settings, domain: str, sender: str, recipients: list[str], message: bytes
    ) -> Deferred[list[Outcome]]:
        """One SMTP transaction carrying ``message`` to every recipient (all in
        ``domain``); one Outcome per recipient, in order.  Never fails: a bug
        here is logged and reported as a deferral, as qmail-send treats a crashed
        qmail-remote."""
        return Deferred.fromCoroutine(self._deliver(settings, domain, sender, recipients, message))

    async def _deliver(
        self, settings: Settings, domain: str, sender: str, recipients: list[str], message: bytes
    ) -> list[Outcome]:
        try:
            return await self._attempt(settings, domain, sender, recipients, message)
        except Exception:
            _log.failure("remote delivery to {domain} crashed", domain=domain)
            return [Outcome.deferral("Remote delivery crashed. (#4.3.0)") for _ in recipients]

    async def _attempt(
        self, settings: Settings, domain: str, sender: str, recipients: list[str], message: bytes
    ) -> list[Outcome]:
        if not _sendable(sender):
            return [Outcome.failure(UNSENDABLE_SENDER) for _ in recipients]
        sendable = [recipient for recipient in recipients if _sendable(recipient)]
        delivered = iter(await self._transact(settings, domain, sender, sendable, message) if sendable else [])
        refused = Outcome.failure(UNSENDABLE_RECIPIENT)
        return [next(delivered) if _sendable(recipient) else refused for recipient in recipients]

    async def _transact(
        self, settings: Settings, domain: str, sender: str, recipients: list[str], message: bytes
    ) -> list[Outcome]:
        try:
            addresses, port = await self._route(settings, domain)
            connection, address = await self._connect(addresses, port, settings)
        except _Verdict as verdict:
            return [Outcome(verdict.kind, verdict.text, unreachable=verdict.unreachable) for _ in recipients]
        transaction = _Transaction(
            connection, address, settings.helohost or settings.me, self._tls, sender, recipients, message
        )
        return await transaction.run()

    async def _route(self, settings: Settings, domain: str) -> tuple[list[str], int]:
        route = settings.route_for(domain)
        if route is not None and route.host:
            name, use_mx, port = route.host, False, route.port or self._remote_port
        else:
            name, use_mx, port = domain, True, self._remote_port
        addresses = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(),
            _plan, self._lookups.resolver, name, use_mx, self._local_addresses,
        )
        return addresses, port

    async def _connect(self, addresses: list[str], port: int, settings: Settings) -> tuple[SMTPConnection, str]:
        """The first address that answers, in order; qmail's tcpto skips repeat timeouts."""
        factory = Factory.forProtocol(partial(SMTPConnection, self._reactor, settings.timeoutremote))
        for address in addresses:
            if self._timeouts.should_skip(address):
                continue
            endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = endpoint_type(self._reactor, address, port, timeout=settings.timeoutconnect)
            try:
                connection = await endpoint.connect(factory)
            except (error.ConnectError, OSError) as failed:
                timed_out = isinstance(failed, (error.TimeoutError, error.TCPTimedOutError))
                self._timeouts.record(address, timed_out=timed_out)
                continue
            self._timeouts.record(address, timed_out=False)
            return connection, address
        raise _Verdict("deferral", NO_CONNECTION, unreachable=True)
