"""The one scriptable fake SMTP server of the tests and bench/: the remote MX,
smarthost or sink that qtwist delivers to.

It runs in threads of its own (one per connection), so it serves an
in-process reactor, a twistd child and a benchmark alike.  A ``Script`` says
how it answers (greeting, extensions, replies per recipient, STARTTLS and
how it goes wrong, holding the final reply back); what it saw is kept per
transaction (sender, recipients, the message as sent and as meant) and per
command (which read it came in, and whether over TLS).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from tests.support.waiting import DEADLINE, wait_until

NAME = b"sink.example.test"


@dataclass
class Script:
    """How the server answers.  ``rcpt`` maps a recipient to its RCPT reply
    (250 when absent); ``tls`` (an ``ssl.SSLContext`` for the server side)
    makes STARTTLS work when ``extensions`` offer it."""

    greeting: bytes = b"220 " + NAME + b" ESMTP"
    extensions: tuple[bytes, ...] = (b"PIPELINING", b"8BITMIME")
    ehlo_code: bytes = b"250"
    rcpt: dict[str, bytes] = field(default_factory=dict)
    mail_reply: bytes = b"250 ok"
    data_reply: bytes = b"354 go ahead"
    final_reply: bytes = b"250 ok accepted"
    tls: ssl.SSLContext | None = None
    starttls_reply: bytes = b"220 ready to start TLS"
    garbage_after_starttls: bool = False  # answer the ClientHello with junk, then hang up
    inject_after_starttls: bool = False  # send replies in the clear right after the 220
    hang_up_after_message: bool = False  # close instead of answering the final dot
    silent: bool = False  # accept connections, never say a word
    hold_until_open: int = 0  # keep final replies back until this many sessions are open


@dataclass
class Transaction:
    """One MAIL transaction; ``raw`` is the data as sent (CRLF, dot-stuffed,
    with the final dot), None until the final dot arrived."""

    sender: str
    recipients: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    raw: bytes | None = None
    arrived_at: float = 0.0  # time.monotonic() when the final dot arrived

    @property
    def data(self) -> bytes:
        """The message as meant: dot-stuffing undone, CRLF line ends as sent."""
        assert self.raw is not None, "the message has not arrived"
        lines = self.raw.split(b"\r\n")[:-2]  # the final "." and what follows its CRLF
        return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)

    @property
    def lf_data(self) -> bytes:
        """``data`` with LF line ends, as qtwist queues and a Maildir keeps a message."""
        return self.data.replace(b"\r\n", b"\n")


class FakeSMTP:
    """A fake SMTP server on ``host``:``port`` (a fresh port unless given), until ``close``."""

    def __init__(self, script: Script | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.script = script or Script()
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Condition()
        self._transactions: list[Transaction] = []
        self.commands: list[tuple[int, bytes, bool]] = []  # (read number, line, over TLS)
        self._sessions: set[socket.socket] = set()
        self.max_open = 0
        self._released = False
        self._closed = False
        self._accepting = threading.Thread(target=self._accept, name=f"fake-smtp-{self.port}", daemon=True)
        self._accepting.start()

    # -- what the tests look at -------------------------------------------------------------

    @property
    def transactions(self) -> list[Transaction]:
        with self._lock:
            return list(self._transactions)

    def delivered(self) -> list[Transaction]:
        return [t for t in self.transactions if t.raw is not None]

    @property
    def messages(self) -> list[bytes]:
        """The messages as sent (CRLF, dot-stuffed, with the final dot), in order."""
        return [t.raw for t in self.delivered()]

    @property
    def sessions_open(self) -> int:
        with self._lock:
            return len(self._sessions)

    def verbs(self) -> list[bytes]:
        with self._lock:
            return [line.split(b" ")[0].split(b":")[0].upper() for _, line, _ in self.commands]

    def command(self, verb: bytes) -> bytes:
        """The first command line starting with ``verb``."""
        with self._lock:
            return next(line for _, line, _ in self.commands if line.upper().startswith(verb))

    def wait_for(self, marker: bytes, timeout: float = DEADLINE) -> Transaction:
        """The first delivered transaction whose data holds ``marker``."""
        def matching() -> list[Transaction]:
            return [t for t in self.delivered() if marker in t.raw]
        return wait_until(matching, f"a message with {marker!r} at the fake SMTP server", timeout)[0]

    def wait_idle(self, timeout: float = DEADLINE) -> None:
        """Until every session has ended, so the transcript is whole."""
        wait_until(lambda: self.sessions_open == 0, "the fake SMTP server's sessions to end", timeout)

    def release(self) -> None:
        """Answer the final dots held back, and hold no more."""
        with self._lock:
            self._released = True
            self._lock.notify_all()

    def abort_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for connection in sessions:
            _quietly(connection.shutdown, socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._released = True
            self._lock.notify_all()
        _quietly(self._listener.shutdown, socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        _quietly(self._listener.close)
        self.abort_all()
        self._accepting.join(DEADLINE)

    def __enter__(self) -> FakeSMTP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the server -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            # Replies go out as written: Nagle's algorithm would hold the second
            # of two pipelined replies back until the client's delayed ACK (40 ms).
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    connection.close()
                    return
                self._sessions.add(connection)
                self.max_open = max(self.max_open, len(self._sessions))
                self._lock.notify_all()
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        session = _Session(self, connection)
        try:
            session.run()
        except (OSError, ValueError):
            pass  # the client went away, or a TLS handshake failed
        finally:
            with self._lock:
                self._sessions.discard(connection)
                self._lock.notify_all()
            _quietly(session.socket.close)
            _quietly(connection.close)

    def _note(self, read: int, line: bytes, secure: bool) -> None:
        with self._lock:
            self.commands.append((read, line, secure))

    def _begin(self, sender: str) -> Transaction:
        transaction = Transaction(sender)
        with self._lock:
            self._transactions.append(transaction)
        return transaction

    def _hold_final_reply(self) -> None:
        """Wait until enough sessions are open at once (only parallel
        deliveries bring that about), or until released."""
        with self._lock:
            self._lock.wait_for(lambda: self._released or len(self._sessions) >= self.script.hold_until_open,
                                timeout=DEADLINE)


class _Session:
    """One connection, read a line at a time from a buffer that counts reads."""

    def __init__(self, server: FakeSMTP, connection: socket.socket) -> None:
        self.server = server
        self.script = server.script
        self.socket: socket.socket = connection
        self.buffer = b""
        self.reads = 0
        self.secure = False

    def run(self) -> None:
        if self.script.silent:
            while self._receive():
                pass
            return
        self._send(self.script.greeting)
        transaction: Transaction | None = None
        while (line := self._line()) is not None:
            self.server._note(self.reads, line, self.secure)
            verb = line.split(b" ")[0].split(b":")[0].upper()
            if verb == b"EHLO":
                self._ehlo()
            elif verb == b"HELO":
                self._send(b"250 " + NAME)
            elif verb == b"STARTTLS":
                if not self._starttls():
                    return
            elif verb == b"MAIL":
                self._send(self.script.mail_reply)
                if self.script.mail_reply.startswith(b"2"):
                    transaction = self.server._begin(_angle_address(line))
            elif verb == b"RCPT" and transaction is not None:
                address = _angle_address(line)
                reply = self.script.rcpt.get(address, b"250 ok")
                transaction.recipients.append(address)
                if reply.startswith(b"2"):
                    transaction.accepted.append(address)
                self._send(reply)
            elif verb == b"DATA" and transaction is not None and transaction.accepted:
                self._send(self.script.data_reply)
                if self.script.data_reply.startswith(b"3"):
                    if not self._message(transaction):
                        return
                transaction = None
            elif verb in (b"RSET", b"NOOP"):
                transaction = None if verb == b"RSET" else transaction
                self._send(b"250 ok")
            elif verb == b"QUIT":
                self._send(b"221 " + NAME)
                return
            elif verb in (b"RCPT", b"DATA"):
                self._send(b"503 bad sequence of commands")
            else:
                self._send(b"502 unimplemented")

    def _ehlo(self) -> None:
        if self.script.ehlo_code != b"250":
            self._send(self.script.ehlo_code + b" not here")
            return
        offered = [e for e in self.script.extensions if not (self.secure and e == b"STARTTLS")]
        lines = [NAME, *offered]
        self._send(b"".join(b"250-" + line + b"\r\n" for line in lines[:-1]) + b"250 " + lines[-1])

    def _starttls(self) -> bool:
        """False when the session is over."""
        if not self.script.starttls_reply.startswith(b"220") or b"STARTTLS" not in self.script.extensions:
            self._send(self.script.starttls_reply if b"STARTTLS" in self.script.extensions
                       else b"502 unimplemented")
            return True
        if self.script.inject_after_starttls:
            self._send(b"220 ready to start TLS\r\n250-" + NAME + b"\r\n250 PIPELINING")
        else:
            self._send(self.script.starttls_reply)
        if self.script.garbage_after_starttls:
            self._receive()
            self.socket.sendall(b"this is not a TLS server hello\r\n" * 4)
            return False
        assert self.script.tls is not None, "STARTTLS offered without a tls context"
        self.socket = self.script.tls.wrap_socket(self.socket, server_side=True)
        self.buffer = b""
        self.secure = True
        return True

    def _message(self, transaction: Transaction) -> bool:
        """Read the data up to the final dot; False when the session is over."""
        while True:
            end = b".\r\n" if self.buffer.startswith(b".\r\n") else b"\r\n.\r\n"
            position = self.buffer.find(end)
            if position >= 0:
                break
            if not self._receive():
                return False
        cut = position + len(end)
        transaction.raw, self.buffer = self.buffer[:cut], self.buffer[cut:]
        transaction.arrived_at = time.monotonic()
        if self.script.hang_up_after_message:
            return False
        if self.script.hold_until_open:
            self.server._hold_final_reply()
        self._send(self.script.final_reply)
        return True

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            if not self._receive():
                return None
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _receive(self) -> bool:
        chunk = self.socket.recv(65536)
        if not chunk:
            return False
        self.reads += 1
        self.buffer += chunk
        return True

    def _send(self, line: bytes) -> None:
        self.socket.sendall(line + b"\r\n")


def _angle_address(line: bytes) -> str:
    start = line.find(b"<")
    end = line.rfind(b">")
    return line[start + 1:end].decode("utf-8", "surrogateescape") if 0 <= start < end else ""


def _quietly(action: Callable, *arguments: object) -> None:
    try:
        action(*arguments)
    except OSError:
        pass
