"""In-memory rigs: the SMTP and POP3 servers and the scheduler as twistd
builds them, minus the sockets and the wall clock.

The parts are the real ones (control files read by a ControlWatcher, a real
queue in the home, vpasswd users, the cred portal and the throttle); only the
connection is a ``StringTransport`` and time is a ``task.Clock`` the test
advances.  Work that runs in threads (the queue's writer, password hashing,
Maildir scans) comes back through the real reactor, so the tests are
``trial`` tests that await replies with a deadline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from qtwist.control import ControlWatcher, Settings
from qtwist.delivery import ILocalDelivery, IRemoteDelivery, Outcome
from qtwist.grants import Grants
from qtwist.hooks import Hooks, PluginContext
from qtwist.login import FailureThrottle, Logins, mail_portal
from qtwist.pop3d import POP3Factory, POP3Server
from qtwist.queue import Queue, QueuedMessage
from qtwist.send import Scheduler
from qtwist.smtpd import SMTPFactory, SMTPServer
from qtwist.users import IUserStore, UserDB
from tests.support.waiting import DEADLINE


async def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Let the real reactor run (threads report back through it) until
    ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        await deferLater(reactor, 0.002, lambda: None)


def _peer(ip: str) -> IPv4Address | IPv6Address:
    if ":" in ip:
        return IPv6Address("TCP", ip, 40000)
    return IPv4Address("TCP", ip, 40000)


class MemoryHome:
    """A home as the servers see it in memory: control files, users, grants, the
    failed-login throttle, all on one Clock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = Clock()
        self.clock.advance(1_800_000_000)  # a plausible "now" for Received: lines and queue ids
        self.control = ControlWatcher(path, clock=self.clock)
        self.users = UserDB(path)
        self.grants = Grants(path, clock=self.clock)
        self.throttle = FailureThrottle(self.clock, lambda: (self.settings.authfaillimit,
                                                             self.settings.authfailwindow,
                                                             self.settings.authfailblock))

    @property
    def settings(self) -> Settings:
        return self.control.settings

    def reload(self) -> None:
        """Read the control files and tcp.smtp again, as the watcher does within a second."""
        self.control.reload()

    def logins(self, service: str, users: IUserStore | None = None) -> Logins:
        """The login flow of ``service``, over ``users`` instead of the home's when given."""
        portal = mail_portal(self.users if users is None else users, service)
        return Logins(f"{service}d", portal, self.throttle, self.clock)


class Client:
    """One client on a StringTransport: what it sends goes to the protocol at once."""

    def __init__(self, protocol, ip: str) -> None:
        self.protocol = protocol
        self.transport = StringTransport(peerAddress=_peer(ip), lenient=True)
        self.read = 0  # how much of the transport's output the test has seen
        protocol.makeConnection(self.transport)

    def send(self, data: bytes | str) -> None:
        self.protocol.dataReceived(data.encode("latin-1") if isinstance(data, str) else data)

    @property
    def output(self) -> bytes:
        """Everything the server wrote so far."""
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def hang_up(self) -> None:
        """The client goes away without a word (a reset, a crash)."""
        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(ConnectionLost("the client hung up")))


class SMTPClient(Client):
    def replies(self) -> list[bytes]:
        """The complete replies not seen yet (multi-line ones joined by CRLF)."""
        replies, end = _smtp_replies(self.output, self.read)
        self.read = end
        return replies

    async def wait(self, count: int, timeout: float = DEADLINE) -> list[bytes]:
        """The next ``count`` replies, once they are written."""
        await wait_for(lambda: len(_smtp_replies(self.output, self.read, count)[0]) == count or self.closed,
                       f"{count} SMTP replies (have {self.output[self.read:]!r})", timeout)
        replies, self.read = _smtp_replies(self.output, self.read, count)
        assert len(replies) == count, f"closed after {replies!r}"
        return replies

    async def ask(self, *lines: str | bytes) -> list[bytes]:
        """Send the lines in one write (pipelined) and wait for a reply to each."""
        data = b"".join((line.encode("latin-1") if isinstance(line, str) else line) + b"\r\n" for line in lines)
        self.send(data)
        return await self.wait(len(lines))


def _smtp_replies(output: bytes, start: int, most: int | None = None) -> tuple[list[bytes], int]:
    replies: list[bytes] = []
    current: list[bytes] = []
    position = start
    while most is None or len(replies) < most:
        end = output.find(b"\r\n", position)
        if end < 0:
            break
        line = output[position:end]
        position = end + 2
        current.append(line)
        if line[3:4] != b"-":
            replies.append(b"\r\n".join(current))
            current = []
            start = position
    return replies, start


class SMTPRig:
    """The SMTP server of one home, as service.py builds it."""

    def __init__(self, home: MemoryHome, *, submission: bool = False, hooks: Hooks | None = None,
                 users: IUserStore | None = None) -> None:
        """``users`` replaces the home's user store (with one that fails, say)."""
        self.home = home
        self.queue = Queue(home.path, reactor, clock=home.clock)
        self.queue.open(1000)
        self.queued: list[QueuedMessage] = []
        self.factory = SMTPFactory(settings=lambda: home.settings, rules=lambda: home.control.rules,
                                   queue=self.queue, queued=self.queued.append, clock=home.clock,
                                   grants=home.grants, submission=submission, logins=home.logins("smtp", users),
                                   hooks=hooks,
                                   plugin_context=PluginContext(home.path, home.users, None, home.clock))

    def connect(self, ip: str = "127.0.0.1") -> SMTPClient:
        return SMTPClient(SMTPServer(self.factory), ip)

    async def greeted(self, ip: str = "127.0.0.1") -> SMTPClient:
        """A client that has read the 220."""
        client = self.connect(ip)
        (banner,) = await client.wait(1)
        assert banner.startswith(b"220 "), banner
        return client

    def close(self) -> Deferred:
        return self.queue.close()


class POP3Client(Client):
    def _pump(self) -> None:
        """Play the consumer of a message being sent: a StringTransport never
        asks a pull producer for more by itself."""
        while self.transport.producer is not None and not self.transport.streaming:
            self.transport.producer.resumeProducing()

    async def wait(self, multiline: bool = False, timeout: float = DEADLINE) -> bytes:
        """The next reply: one line, or (``multiline`` after +OK) up to the
        final '.', with line ends as sent."""
        def complete() -> int:
            self._pump()
            return _pop3_reply_end(self.output, self.read, multiline)
        await wait_for(lambda: complete() or self.closed, f"a POP3 reply (have {self.output[self.read:]!r})",
                       timeout)
        end = complete()
        assert end, f"closed without a reply; got {self.output[self.read:]!r}"
        reply, self.read = self.output[self.read:end], end
        return reply

    async def ask(self, line: str, multiline: bool = False) -> bytes:
        self.send(line + "\r\n")
        return await self.wait(multiline)

    def hang_up(self) -> None:
        """As a real transport does, stop a message being sent before telling the protocol."""
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
        super().hang_up()


def _pop3_reply_end(output: bytes, start: int, multiline: bool) -> int:
    """Where the reply starting at ``start`` ends (0 while it is not whole).
    An -ERR is one line even where +OK would have a body."""
    first = output.find(b"\r\n", start)
    if first < 0:
        return 0
    if not multiline or output.startswith(b"-ERR", start):
        return first + 2
    if output.startswith(b".\r\n", first + 2):
        return first + 5
    end = output.find(b"\r\n.\r\n", first)
    return 0 if end < 0 else end + 5


class POP3Rig:
    """The POP3 server of one home, as service.py builds it."""

    def __init__(self, home: MemoryHome, *, users: IUserStore | None = None) -> None:
        """``users`` replaces the home's user store (with one that fails, say)."""
        self.home = home
        self.factory = POP3Factory(logins=home.logins("pop3", users), grants=home.grants,
                                   settings=lambda: home.settings, clock=home.clock)

    def connect(self, ip: str = "127.0.0.1") -> POP3Client:
        return POP3Client(POP3Server(self.factory), ip)

    async def greeted(self, ip: str = "127.0.0.1") -> POP3Client:
        client = self.connect(ip)
        greeting = await client.wait()
        assert greeting.startswith(b"+OK "), greeting
        return client


# -- the scheduler's delivery channels, answered by the test ----------------------------------------

class Attempt:
    """One delivery handed to a scripted channel, waiting for the test's answer."""

    def __init__(self, recipients: list[str], sender: str, body: Callable[[], bytes]) -> None:
        self.recipients = recipients
        self.sender = sender
        self.body = body
        self.result: Deferred = Deferred()

    def answer(self, *outcomes: Outcome) -> None:
        """One outcome for all recipients, or one each."""
        if len(outcomes) == 1:
            outcomes = outcomes * len(self.recipients)
        self.result.callback(list(outcomes))


class _Scripted:
    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.closed = False  # after the test: every attempt is deferred at once

    @property
    def waiting(self) -> list[Attempt]:
        """Attempts not answered yet, oldest first."""
        return [attempt for attempt in self.attempts if not attempt.result.called]

    async def take(self) -> Attempt:
        """The only attempt not answered yet, once it is there (a message that
        is not in memory any more is read from the queue in a thread first)."""
        await wait_for(lambda: self.waiting, "a delivery attempt")
        (attempt,) = self.waiting
        return attempt

    def _attempt(self, attempt: Attempt) -> Deferred:
        self.attempts.append(attempt)
        if self.closed:
            attempt.answer(Outcome.deferral("the test is over"))
        return attempt.result


@implementer(ILocalDelivery)
class ScriptedLocal(_Scripted):
    """Local deliveries the test answers, one recipient each."""

    def start(self) -> None:
        pass

    def stop(self) -> Deferred:
        return succeed(None)

    def deliver(self, message: QueuedMessage, recipient: str) -> Deferred:
        return self._attempt(Attempt([recipient], message.sender, message.read_body)).addCallback(
            lambda outcomes: outcomes[0])


@implementer(IRemoteDelivery)
class ScriptedRemote(_Scripted):
    """Remote deliveries (one domain each) the test answers."""

    def deliver(self, settings: Settings, domain: str, sender: str, recipients: list[str],
                message: bytes) -> Deferred:
        return self._attempt(Attempt(list(recipients), sender, lambda: message))


class SchedulerRig:
    """The scheduler of one home over its real queue, with scripted channels."""

    def __init__(self, home: MemoryHome) -> None:
        self.home = home
        self.clock = home.clock
        self.queue = Queue(home.path, reactor, clock=home.clock)
        self.local = ScriptedLocal()
        self.remote = ScriptedRemote()
        self.scheduler = Scheduler(self.queue, lambda: home.settings, self.local, self.remote, home.clock)

    def start(self) -> SchedulerRig:
        self.scheduler.startService()
        return self

    async def send(self, sender: str, recipients: list[str],
                   body: bytes = b"Subject: test\n\nhello\n") -> QueuedMessage:
        """What qmail-smtpd and qmail-queue do: queue durably, then hand over."""
        message = await self.queue.accept(sender, recipients, body)
        self.scheduler.submit(message)
        return message

    async def settled(self) -> None:
        """Until the scheduler has recorded what the channels answered: all its
        work is done but the deliveries still waiting for an answer."""
        await wait_for(lambda: self.scheduler.unfinished <= len(self.local.waiting) + len(self.remote.waiting),
                       "the scheduler to record the answers")

    def stop(self) -> Deferred:
        """Stop the scheduler; deliveries the test left unanswered are deferred."""
        if not self.scheduler.running:
            return self.queue.close()
        for channel in (self.local, self.remote):
            channel.closed = True
            for attempt in channel.waiting:
                attempt.answer(Outcome.deferral("the test is over"))
        return self.scheduler.stopService()
