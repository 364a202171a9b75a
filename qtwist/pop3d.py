"""The POP3 server: RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595), UIDL, TOP, APOP.

qmail's qmail-popup + checkpassword + qmail-pop3d in one protocol over the
vpasswd users' Maildirs.  Twisted's ``pop3.POP3`` is not used: its APOP never
succeeds, it has no STLS, and its Maildir mailbox moves messages away on DELE
(so a dropped connection loses them); fixing those would mean replacing most
of it.  This one keeps what made it worth a look: commands are answered in
order, one at a time, while slow work (password hashing, directory scans,
deletions) runs in worker threads, and RETR/TOP stream from the file.

Logins go through the same flow as SMTP AUTH (login.py), so the user
store's flags, hashing in worker threads and the lock-out of a guessing
client work alike for both.

The maildrop follows the Maildir spec as qmail-pop3d does (maildir.py): at
login new/ moves to cur/ with ``:2,`` info, DELE only marks, QUIT unlinks
(and flags what RETR sent with S, a courtesy to IMAP readers of the same
Maildir); unlike qmail-pop3d the STAT/LIST sizes are the exact octets sent
(CRLF line ends), as RFC 1939 asks.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Coroutine, Iterator

from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from qtwist import maildir
from qtwist.descriptors import DescriptorBudget
from qtwist.grants import Grants, SQLGrants
from qtwist.limits import Admission, pop3_limits
from qtwist.login import NO_IP, APOPCredentials, Logins, PlainCredentials, Refusal, client_address
from qtwist.numbers import decimal
from qtwist.tls import can_upgrade, is_encrypted
from qtwist.users import User, UserStoreUnavailable

if TYPE_CHECKING:
    from qtwist.control import Settings

_log = Logger()

CLOSE_GRACE = 30  # how long a client gets to finish closing before the connection is cut
# RFC 2449 allows 255 octets a command; some clients send longer passwords.
MAX_COMMAND_LENGTH = 1024
CHUNK_SIZE = 65536
_MAX_UID_LENGTH = 70  # RFC 1939 §7

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"
REFUSED = {
    Refusal.WRONG: "-ERR [AUTH] authorization failed",
    Refusal.BLOCKED: "-ERR [SYS/TEMP] too many failed logins from your address, try again later",
    Refusal.UNAVAILABLE: "-ERR [SYS/TEMP] unable to check the password now, try again later",
}

# What a command handler returns: None when it has replied, or the work still to do.
Outcome = Coroutine[object, object, None] | None


# ---------------------------------------------------------------------------
# Message text as sent: CRLF line ends, dot-stuffing, TOP's cut.
# ---------------------------------------------------------------------------


def crlf_chunks(handle: IO[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The file's bytes with every bare LF made CRLF, and a final line end if missing.

    Maildir files have LF ends (qmail-local writes them so); CRLF ends already
    there stay as they are.  Yields no empty chunk.
    """
    carry = b""
    last = b""
    while data := handle.read(chunk_size):
        last = data[-1:]
        data = carry + data
        # A CR at the end may be half of a CRLF split across two reads.
        carry = b"\r" if data.endswith(b"\r") else b""
        if carry:
            data = data[:-1]
        if data:
            yield data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if carry:
        yield b"\r\n"
    elif last and last != b"\n":
        yield b"\r\n"


def open_message(path: Path) -> IO[bytes]:
    """The message file for reading; never through a symlink, which could point at any file
    the server may read (a key, another user's mail)."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def message_size(path: Path) -> int:
    """The octets RETR sends for ``path`` before dot-stuffing (what STAT and LIST report)."""
    with open_message(path) as handle:
        return sum(len(chunk) for chunk in crlf_chunks(handle))


def top_chunks(chunks: Iterator[bytes], body_lines: int) -> Iterator[bytes]:
    """The header, the blank line and the first ``body_lines`` body lines of CRLF text.

    Relies on ``crlf_chunks`` never ending a chunk between CR and LF, so a
    CRLFCRLF split across chunks shows as one chunk ending in CRLF and the
    next starting with CRLF.
    """
    in_header = True
    at_line_start = True
    lines_left = body_lines
    for chunk in chunks:
        position = 0
        if in_header:
            if at_line_start and chunk.startswith(b"\r\n"):
                position = 2
            else:
                blank = chunk.find(b"\r\n\r\n")
                if blank < 0:
                    yield chunk
                    at_line_start = chunk.endswith(b"\r\n")
                    continue
                position = blank + 4
            in_header = False
        while lines_left:
            end = chunk.find(b"\r\n", position)
            if end < 0:
                break
            position = end + 2
            lines_left -= 1
        if not lines_left:
            yield chunk[:position]
            return
        yield chunk


def dot_stuffed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """CRLF text made into a POP3 multi-line body: '.'-led lines doubled, '.' CRLF at the end.

    The end marker rides with the last chunk, so a message of one chunk goes
    out in one write.
    """
    at_line_start = True
    previous = b""
    for chunk in chunks:
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        if at_line_start and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        at_line_start = chunk.endswith(b"\r\n")
        if previous:
            yield previous
        previous = stuffed
    yield previous + b".\r\n"


# ---------------------------------------------------------------------------
# The session's maildrop (``measure`` blocks: it runs in worker threads).
# ---------------------------------------------------------------------------


@dataclass
class Message:
    """One message of a session's maildrop."""

    path: Path
    uid: str
    size: int | None = None  # measured on first need, then kept for the session
    deleted: bool = False
    retrieved: bool = False  # a whole RETR: flagged seen at QUIT


def unique_id(file_name: str) -> str:
    """The UIDL of a Maildir file: its unique name, which never changes.

    RFC 1939 allows only 1–70 characters 0x21–0x7E; a name outside that (an
    odd delivery agent's) is replaced by a digest of it, still stable.
    """
    unique = maildir.unique_part(file_name)
    if 0 < len(unique) <= _MAX_UID_LENGTH and all(0x21 <= ord(char) <= 0x7E for char in unique):
        return unique
    return hashlib.md5(unique.encode("utf-8", "surrogateescape")).hexdigest()


def measure(paths: list[Path]) -> list[int]:
    """Sizes of the files as sent; a file gone or unreadable counts 0 (RETR will say so)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(message_size(path))
        except OSError:
            sizes.append(0)
    return sizes


def login_address(login: str) -> str:
    """``user%domain`` (for clients that cannot send '@' in a login) as ``user@domain``."""
    if "@" not in login and "%" in login:
        user, _, domain = login.rpartition("%")
        return f"{user}@{domain}"
    return login


def _bytes(text: str) -> bytes:
    """Client text back as the octets it came as (lines are decoded with surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Streaming a message to the client.
# ---------------------------------------------------------------------------


@implementer(IPullProducer)
class MessageSender:
    """Writes a message a chunk at a time, each time the transport wants more.

    Reads happen on the reactor thread, a chunk at a time, as Twisted's
    FileSender does: only one chunk is ever in memory.
    """

    def __init__(self, handle: IO[bytes], chunks: Iterator[bytes],
                 on_progress: Callable[[], None]) -> None:
        self._handle = handle
        self._chunks = chunks
        self._on_progress = on_progress
        self._consumer: ITCPTransport | None = None
        self._done: Deferred[None] | None = None

    def send(self, consumer: ITCPTransport) -> Deferred[None]:
        """Fires when the last chunk is written; fails if the connection or the file fails."""
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        consumer.registerProducer(self, False)
        return done

    def resumeProducing(self) -> None:
        if self._done is None:
            return
        try:
            chunk = next(self._chunks, None)
        except OSError as error:
            # Half a message must never look complete: the client sees the connection drop.
            self._finish(error)
            self._consumer.abortConnection()
            return
        if chunk is None:
            self._finish(None)
        else:
            self._on_progress()
            self._consumer.write(chunk)

    def stopProducing(self) -> None:
        if self._done is not None:
            self._finish(ConnectionLost("the client went away during the transfer"))

    def _finish(self, error: Exception | None) -> None:
        done, self._done = self._done, None
        self._handle.close()
        self._consumer.unregisterProducer()
        if error is None:
            done.callback(None)
        else:
            done.errback(error)


# ---------------------------------------------------------------------------
# The protocol.
# ---------------------------------------------------------------------------


class POP3Server(LineReceiver, TimeoutMixin):
    """One POP3 session.

    A command whose handler returns a coroutine pauses line delivery until it
    is done, so pipelined commands (RFC 2449 PIPELINING) are answered in order.
    """

    delimiter = b"\n"  # CRLF, tolerating bare LF; the CR is stripped per line
    MAX_LENGTH = MAX_COMMAND_LENGTH

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self.callLater = factory.clock.callLater  # for TimeoutMixin
        self._state = AUTHORIZATION
        self._user_name: str | None = None
        self._timestamp = ""
        self._encrypted = False
        self._gone = False
        self._closing = False
        self._sending = False  # a message is being streamed
        # Why reading stops: a command runs ("command"), or the client does not
        # read its replies and the transport's buffer is full ("output").
        self._held: set[str] = set()
        self.last_activity = 0.0
        self._lock_key: str | None = None
        self._maildir: Path | None = None
        self._messages: list[Message] = []
        self._client_ip = NO_IP
        self._settings: Settings | None = None
        self._handlers: dict[str, tuple[tuple[str, ...], Callable[[str], Outcome]]] = {
            "USER": ((AUTHORIZATION,), self.do_USER),
            "PASS": ((AUTHORIZATION,), self.do_PASS),
            "APOP": ((AUTHORIZATION,), self.do_APOP),
            "STLS": ((AUTHORIZATION,), self.do_STLS),
            "CAPA": ((AUTHORIZATION, TRANSACTION), self.do_CAPA),
            "NOOP": ((AUTHORIZATION, TRANSACTION), self.do_NOOP),
            "QUIT": ((AUTHORIZATION, TRANSACTION), self.do_QUIT),
            "STAT": ((TRANSACTION,), self.do_STAT),
            "LIST": ((TRANSACTION,), self.do_LIST),
            "UIDL": ((TRANSACTION,), self.do_UIDL),
            "RETR": ((TRANSACTION,), self.do_RETR),
            "TOP": ((TRANSACTION,), self.do_TOP),
            "DELE": ((TRANSACTION,), self.do_DELE),
            "RSET": ((TRANSACTION,), self.do_RSET),
        }

    # -- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._client_ip = client_address(self.transport)
        # One snapshot per session: a reload never changes the rules halfway through a login.
        self._settings = self.factory.settings()
        self.last_activity = self.factory.clock.seconds()
        refused = self.factory.admission.admit(self, self._client_ip, pop3_limits(self._settings),
                                               self.last_activity)
        if refused is not None:
            self._reply(f"-ERR [SYS/TEMP] {refused}")
            self.transport.loseConnection()
            self._gone = True
            return
        self.transport.registerProducer(self, True)
        # True for implicit TLS (pop3s); STLS sets it later.
        self._encrypted = is_encrypted(self.transport)
        # Replies are lock-step: Nagle's algorithm would hold a reply's last small piece
        # back until the client's delayed ACK, some 40 ms per command.  (A TLS wrapper
        # passes the call on to the TCP transport beneath it.)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self.setTimeout(self._settings.timeoutpop3d)
        # The APOP timestamp: a msg-id unique to this greeting (RFC 1939 §7).
        me = self._settings.me
        self._timestamp = f"<{os.getpid()}.{secrets.token_hex(8)}.{int(self.factory.clock.seconds())}@{me}>"
        self._reply(f"+OK {self._timestamp}")

    def connectionLost(self, reason: object = None) -> None:
        self._gone = True
        self.setTimeout(None)
        self.factory.admission.release(self)
        if self.factory.budget is not None:
            self.factory.budget.closed()
        if self._state != UPDATE:  # QUIT releases the lock once its deletions are done
            self._release_lock()

    def timeoutConnection(self) -> None:
        self._hang_up("-ERR autologout time elapsed")

    def evict(self) -> None:
        """The server is full and this session has been silent the longest (limits.py)."""
        self._hang_up("-ERR [SYS/TEMP] the server is full, closing an idle connection")

    def _hang_up(self, last_words: str) -> None:
        if self._closing or self._sending or "output" in self._held:
            # It never read our last bytes, never answered a TLS close, or reads
            # nothing any more: cut it.  In the middle of a message a reply would
            # land inside the message, which must rather look unfinished.
            self.transport.abortConnection()
            return
        self._reply(last_words)
        self._close()
        self.setTimeout(CLOSE_GRACE)

    @property
    def busy(self) -> bool:
        """A command runs: the session waits on the server, it is not idle."""
        return "command" in self._held

    # Flow control: IPushProducer for the transport, and a hold while a command runs.

    def pauseProducing(self) -> None:
        """The client does not read its replies: read and answer nothing more."""
        self._hold("output")

    def resumeProducing(self) -> None:
        self._unhold("output")

    def _hold(self, reason: str) -> None:
        if not self._held:
            LineReceiver.pauseProducing(self)
        self._held.add(reason)

    def _unhold(self, reason: str) -> None:
        if reason not in self._held:
            return
        self._held.discard(reason)
        # Reading resumes even when closing: a TLS close waits for the client's close_notify.
        if not self._held and not self._gone:
            LineReceiver.resumeProducing(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._closing:
            return
        self._reply("-ERR line too long")
        self._close()

    def _close(self) -> None:
        """Close after the last reply; commands already pipelined behind it are
        ignored.  The session stops being the transport's producer: TLS does
        not close while one is registered."""
        self._closing = True
        self.factory.admission.release(self)  # as SMTPServer.closing: a client may reconnect at once
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self.last_activity = self.factory.clock.seconds()
        self.factory.admission.active(self)
        text = line.rstrip(b"\r").decode("utf-8", "surrogateescape")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        known = self._handlers.get(verb)
        if known is None:
            self._reply("-ERR unimplemented")
            return
        states, handler = known
        if self._state not in states:
            self._reply(f"-ERR {verb} is not valid in the {self._state} state")
            return
        outcome = handler(argument)
        if inspect.iscoroutine(outcome):
            self._hold("command")
            running = Deferred.fromCoroutine(outcome)
            running.addErrback(self._failed, verb)
            running.addBoth(self._next_command)

    def _failed(self, failure: Failure, verb: str) -> None:
        if self._gone:
            return
        _log.failure("pop3d: {verb} failed", failure, verb=verb)
        self._reply("-ERR [SYS/TEMP] internal error, try again later")

    def _next_command(self, _: object) -> None:
        self._unhold("command")

    def _reply(self, text: str) -> None:
        self.transport.write(text.encode("utf-8", "surrogateescape") + b"\r\n")

    def _reply_lines(self, first: str, lines: list[str]) -> None:
        """A multi-line reply; these lines never start with '.', so need no stuffing."""
        body = "".join(f"{line}\r\n" for line in lines)
        self.transport.write(f"{first}\r\n{body}.\r\n".encode("ascii"))

    # -- AUTHORIZATION -------------------------------------------------------------

    def _plaintext_allowed(self) -> bool:
        """USER/PASS send the password itself: where control/pop3requiretls says so, only inside TLS."""
        return self._encrypted or not self._settings.pop3requiretls

    def do_CAPA(self, argument: str) -> None:
        capabilities = ["TOP", "UIDL"]
        if self._state == AUTHORIZATION and self._plaintext_allowed():
            capabilities.append("USER")
        capabilities += ["PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]
        if self._state == AUTHORIZATION and can_upgrade(self.transport, self.factory.tls_options, self._encrypted):
            capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION qtwist")
        self._reply_lines("+OK capability list follows", capabilities)

    def do_STLS(self, argument: str) -> None:
        if self._encrypted:
            self._reply("-ERR already using TLS")
            return
        if not can_upgrade(self.transport, self.factory.tls_options, self._encrypted):
            self._reply("-ERR STLS not available")
            return
        self._reply("+OK begin TLS negotiation")
        # Anything pipelined after STLS came in the clear: never act on it (RFC 2595 §4).
        self.clearLineBuffer()
        self.transport.startTLS(self.factory.tls_options)
        self._encrypted = True
        self._user_name = None

    def do_USER(self, argument: str) -> None:
        if not self._plaintext_allowed():
            self._reply("-ERR [AUTH] use STLS before logging in")
            return
        if not argument.strip():
            self._reply("-ERR syntax error")
            return
        self._user_name = argument.strip()
        self._reply("+OK")

    def do_PASS(self, argument: str) -> Outcome:
        if not self._plaintext_allowed():
            self._reply("-ERR [AUTH] use STLS before logging in")
            return None
        if self._user_name is None:
            self._reply("-ERR USER first")
            return None
        address = login_address(self._user_name)
        self._user_name = None
        return self._login(PlainCredentials(_bytes(address), _bytes(argument)), "USER")

    def do_APOP(self, argument: str) -> Outcome:
        # Allowed in the clear whatever pop3requiretls says: APOP never sends the password.
        name, _, digest = argument.strip().rpartition(" ")
        if not name or not digest:
            self._reply("-ERR syntax error")
            return None
        address = login_address(name)
        return self._login(APOPCredentials(_bytes(address), _bytes(self._timestamp), _bytes(digest)), "APOP")

    async def _login(self, credentials: ICredentials, method: str) -> None:
        """Log in (login.py), then grant relaying and open the maildrop."""
        result = await self.factory.logins.login(credentials, self._client_ip, method)
        if self._gone:
            return
        if result.user is None:
            self._reply(REFUSED[result.refusal])
            return
        if result.user.may_relay:  # vpopmail's NO_RELAY flag: mail may be read, not relayed (as vchkpw does)
            self._record_grant()
        await self._open(result.user)

    async def _open(self, user: User) -> None:
        """Lock the maildrop for this session and list it: the TRANSACTION state begins."""
        lock_key = str(user.maildir)
        if not self.factory.lock(lock_key):
            self._reply("-ERR [IN-USE] maildrop already locked")
            return
        self._lock_key = lock_key
        try:
            paths = await deferToThread(maildir.take_new, user.maildir)
        except OSError:
            _log.failure("pop3d: cannot open the maildrop {maildir}", maildir=str(user.maildir))
            self._release_lock()
            self._reply("-ERR [SYS/TEMP] unable to open the maildrop")
            return
        if self._gone:
            return
        self._maildir = user.maildir
        self._messages = [Message(path, unique_id(path.name)) for path in paths]
        self._state = TRANSACTION
        self._reply("+OK")

    def _record_grant(self) -> None:
        """POP-before-SMTP: this client IP may relay for a while."""
        if self._client_ip == NO_IP:
            return
        try:
            recorded = self.factory.grants.record(self._client_ip)
        except (OSError, ValueError):
            _log.failure("pop3d: cannot record the relay grant for {ip}", ip=self._client_ip)
            return
        if isinstance(recorded, Deferred):  # the relay table: written while the session goes on
            recorded.addErrback(self._grant_failed)

    def _grant_failed(self, failure: Failure) -> None:
        if not failure.check(UserStoreUnavailable):  # an outage is logged by the database once
            _log.failure("pop3d: cannot record the relay grant for {ip}", failure, ip=self._client_ip)

    def _release_lock(self) -> None:
        if self._lock_key is not None:
            self.factory.unlock(self._lock_key)
            self._lock_key = None

    def do_NOOP(self, argument: str) -> None:
        self._reply("+OK")

    def do_QUIT(self, argument: str) -> Outcome:
        if self._state == AUTHORIZATION:
            self._reply("+OK")
            self._close()
            return None
        return self._update()

    async def _update(self) -> None:
        """The UPDATE state: only now do DELE marks remove files (RFC 1939 §6)."""
        self._state = UPDATE
        doomed = [message.path for message in self._messages if message.deleted]
        seen = [message.path for message in self._messages if message.retrieved and not message.deleted]
        failures = 0
        try:
            if doomed or seen:
                failures = await deferToThread(maildir.remove_and_flag, self._maildir, doomed, seen)
        except OSError:
            _log.failure("pop3d: updating the maildrop {maildir} at QUIT failed",
                         maildir=str(self._maildir))
            failures = len(doomed)
        finally:
            self._release_lock()
        if self._gone:
            return
        if failures:
            self._reply("-ERR some deleted messages not removed")
        else:
            self._reply("+OK")
        self._close()

    # -- TRANSACTION -----------------------------------------------------------------

    def _message(self, argument: str) -> tuple[int, Message] | None:
        """The number and live message ``argument`` names, or None after replying -ERR."""
        number = decimal(argument.strip())
        if number is None:
            self._reply("-ERR syntax error")
            return None
        if not 1 <= number <= len(self._messages):
            self._reply("-ERR no such message")
            return None
        message = self._messages[number - 1]
        if message.deleted:
            self._reply(f"-ERR message {number} already deleted")
            return None
        return number, message

    def _live(self) -> list[tuple[int, Message]]:
        return [(number, message) for number, message in enumerate(self._messages, 1)
                if not message.deleted]

    async def _measure(self, messages: list[Message]) -> None:
        unknown = [message for message in messages if message.size is None]
        if unknown:
            sizes = await deferToThread(measure, [message.path for message in unknown])
            for message, size in zip(unknown, sizes):
                message.size = size

    async def do_STAT(self, argument: str) -> None:
        live = [message for _, message in self._live()]
        await self._measure(live)
        self._reply(f"+OK {len(live)} {sum(message.size for message in live)}")

    def do_LIST(self, argument: str) -> Outcome:
        if not argument.strip():
            return self._list_all()
        found = self._message(argument)
        return None if found is None else self._list_one(*found)

    async def _list_one(self, number: int, message: Message) -> None:
        await self._measure([message])
        self._reply(f"+OK {number} {message.size}")

    async def _list_all(self) -> None:
        live = self._live()
        await self._measure([message for _, message in live])
        lines = [f"{number} {message.size}" for number, message in live]
        self._reply_lines(f"+OK {len(live)} messages", lines)

    def do_UIDL(self, argument: str) -> None:
        if argument.strip():
            found = self._message(argument)
            if found is not None:
                number, message = found
                self._reply(f"+OK {number} {message.uid}")
            return
        lines = [f"{number} {message.uid}" for number, message in self._live()]
        self._reply_lines("+OK unique-id listing follows", lines)

    def do_RETR(self, argument: str) -> Outcome:
        found = self._message(argument)
        return None if found is None else self._send(found[1], None)

    def do_TOP(self, argument: str) -> Outcome:
        number, _, lines_text = argument.strip().partition(" ")
        lines = decimal(lines_text.strip())
        if lines is None:
            self._reply("-ERR syntax error")
            return None
        found = self._message(number)
        return None if found is None else self._send(found[1], lines)

    async def _send(self, message: Message, body_lines: int | None) -> None:
        """RETR (``body_lines`` None) or TOP, streamed; a whole RETR will flag the message seen."""
        try:
            handle = open_message(message.path)
        except OSError:
            self._reply("-ERR unable to open that message")
            return
        chunks = crlf_chunks(handle)
        if body_lines is not None:
            chunks = top_chunks(chunks, body_lines)
        self._reply("+OK message follows")
        sender = MessageSender(handle, dot_stuffed(chunks), self.resetTimeout)
        # The message paces itself (a pull producer) while it is sent.
        self.transport.unregisterProducer()
        self._held.discard("output")
        self._sending = True
        try:
            await sender.send(self.transport)
        except ConnectionLost:
            self._gone = True  # connectionLost follows; no further command may run
            return
        finally:
            self._sending = False
        self.transport.registerProducer(self, True)
        if body_lines is None:
            message.retrieved = True

    def do_DELE(self, argument: str) -> None:
        found = self._message(argument)
        if found is not None:
            number, message = found
            message.deleted = True
            self._reply(f"+OK message {number} deleted")

    def do_RSET(self, argument: str) -> None:
        for message in self._messages:
            message.deleted = False
        self._reply(f"+OK {len(self._messages)} messages")


class POP3Factory(ServerFactory):
    """Builds POP3 sessions and holds what they share: the logins, grants,
    the mailbox locks.

    One factory serves every POP3 listener (``--pop3`` and, wrapped in TLS,
    ``--pop3s``), so the in-memory lock table covers all sessions.  The
    ``logins`` share their throttle with SMTP AUTH's, so a client guessing
    passwords is counted once, whichever protocol it tries.  ``settings``
    (control/pop3requiretls, me) is read at each new session and
    ``tls_options`` at each STLS, so a reload applies without a restart.
    """

    def __init__(self, *, logins: Logins, grants: Grants | SQLGrants, settings: Callable[[], "Settings"],
                 tls_options: object | None = None, clock: IReactorTime | None = None,
                 budget: DescriptorBudget | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.logins = logins
        self.grants = grants
        self.settings = settings
        self.tls_options = tls_options
        self.clock = clock
        self.admission = Admission()  # pop3concurrency* count the pop3 and pop3s listeners together
        self.budget = budget
        self._locked: set[str] = set()

    def buildProtocol(self, addr: object) -> POP3Server | None:
        if self.budget is not None and not self.budget.opened():
            return None
        return POP3Server(self)

    def lock(self, key: str) -> bool:
        """Take the maildrop ``key`` for one session; False when another session holds it."""
        if key in self._locked:
            return False
        self._locked.add(key)
        return True

    def unlock(self, key: str) -> None:
        self._locked.discard(key)
