"""The I/O half of a pipelining line server (SMTP, RFC 2920): commands
answered strictly in order, however long a check takes, without one reactor
turn or one copy of the buffer per command.

A subclass gives the state machine: ``line_received`` for each line (it may
return a Deferred: nothing more is read until it fires), a ``bulk`` reader
for data that is not lines (SMTP's DATA), and what to say when a line is too
long or the client idles too long.  Replies go to ``out`` and are written
together once the bytes at hand are handled.

Reading stops for two reasons: a check is running and the client keeps
sending ("input"), or the client does not read its replies and the
transport's buffer is full ("output": the session is the transport's push
producer), so no client can make the server hold more than a few buffers.

The idle limit counts from the client's last whole line (a command, or a
line of bulk data) or from the end of the server's own wait, whichever is
later: a client that trickles bytes, or reads no replies, is dropped in time.
"""

from __future__ import annotations

from typing import Protocol as Structural

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

MAX_LINE = 4096
# How often (seconds) a talking session tells the connection limits it is active.
ACTIVITY_REPORTS = 1.0

log = Logger(namespace="qtwist.pipelining")


class Bulk(Structural):
    """Data that is not lines, read until its own end (SMTP's DataReader)."""

    def feed(self, chunk: bytes) -> None:
        ...


def write_now(transport, data: bytes) -> None:
    """Send a reply at once when the socket can take it.

    Twisted's write() only queues the bytes and waits for the next poll,
    which costs two epoll_ctl calls and a loop turn per reply: an eighth of
    the reactor's time when every message is its own short session.  On a
    plain TCP transport with nothing queued, send() now and queue only what
    the kernel did not take; anything else (TLS, a backlog, a Twisted whose
    transport looks different) goes the usual way.
    """
    if (type(transport) is tcp.Server and not transport.TLS and transport.connected
            and not transport.disconnecting and getattr(transport, "_tempDataLen", 1) == 0
            and transport.offset == len(transport.dataBuffer)):
        sent = transport.writeSomeData(data)
        if not isinstance(sent, int):
            sent = 0  # an error: the queued write below meets it again and closes
        data = data[sent:]
    if data:
        transport.write(data)


@implementer(IPushProducer)
class PipeliningServer(Protocol):
    """Buffering, ordering, flow control and the idle timeout of one session."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.buffer = b""
        self.offset = 0
        self.bulk: Bulk | None = None
        self.discarding_line = False
        self.busy = False
        self.reading_stopped: set[str] = set()
        self.out: list[bytes] = []
        self.idle_limit = 0.0
        self.last_activity = 0.0
        self.reported_activity: float | None = None
        self.timer = None
        # Twisted keeps ``transport`` after the connection is lost: this says
        # the client is gone, so nothing is read, answered or closed any more.
        self.gone = False

    # -- what a subclass gives ----------------------------------------------------------

    def line_received(self, line: str) -> Deferred | None:
        """One line, without its line end (decoded as latin-1, so any byte survives)."""
        raise NotImplementedError

    def bulk_ended(self) -> bool:
        """With ``bulk`` set: finish it if its end has arrived (clearing ``bulk``), else False."""
        raise NotImplementedError

    def line_too_long(self) -> None:
        raise NotImplementedError

    def timed_out(self) -> None:
        """The client sent no whole line for ``idle_limit`` seconds while nothing ran."""
        raise NotImplementedError

    def active(self) -> None:
        """The client completed a line: a command, or a line of bulk data."""

    def failed(self) -> None:
        """A handler's Deferred failed (a bug: handlers answer their own errors);
        the failure is logged, the command still needs a reply."""
        raise NotImplementedError

    # -- the connection -----------------------------------------------------------------

    def start(self, idle_limit: float) -> None:
        """Take the transport's flow control and start the idle timer (at connection)."""
        self.transport.registerProducer(self, True)
        self.idle_limit = idle_limit
        self.last_activity = self.clock.seconds()
        self.timer = self.clock.callLater(idle_limit, self._check_timeout)

    def connectionLost(self, reason=None) -> None:
        self.gone = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.bulk = None

    def _close(self) -> None:
        """Write what is pending, then close (a transport with a registered
        producer would otherwise stay open)."""
        self.closing()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def closing(self) -> None:
        """The session is over (the transport closes once its replies are out)."""

    def _check_timeout(self) -> None:
        remaining = self.idle_limit - (self.clock.seconds() - self.last_activity)
        if remaining > 0 or self.busy:
            self.timer = self.clock.callLater(max(remaining, 1.0), self._check_timeout)
            return
        self.timer = None
        self.timed_out()

    def _hang_up(self, last_words: bytes) -> None:
        """Say ``last_words`` and close; a client that reads nothing more is cut off
        at once, since the words would only wait in a full buffer."""
        if "output" in self.reading_stopped:
            self.transport.abortConnection()
            return
        self.transport.write(last_words)
        self._close()

    @property
    def disconnecting(self) -> bool:
        return bool(getattr(self.transport, "disconnecting", False))

    # -- input ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # Only a whole line counts as activity: a client that trickles a byte
        # at a time still meets the idle limit.
        if b"\n" in data:
            self.last_activity = now = self.clock.seconds()
            # Connection limits need it to the second, not for every piece of a message.
            if self.reported_activity is None or now - self.reported_activity >= ACTIVITY_REPORTS:
                self.reported_activity = now
                self.active()
        if self.busy:
            self.buffer += data
            if len(self.buffer) - self.offset > MAX_LINE * 16:
                self._stop_reading("input")
            return
        if self.bulk is not None:
            self.bulk.feed(data)
        else:
            self.buffer += data
        self._process()

    def _process(self) -> None:
        """Handle every complete line (or the end of bulk data) in the buffer.
        Lines are cut at an offset, so a buffer of many pipelined commands is
        not copied once per command."""
        while (not self.busy and "output" not in self.reading_stopped and not self.gone
               and not self.disconnecting):
            if self.bulk is not None:
                if not self.bulk_ended():
                    break
                continue
            newline = self.buffer.find(b"\n", self.offset)
            if newline < 0:
                if len(self.buffer) - self.offset > MAX_LINE:
                    if not self.discarding_line:
                        self.line_too_long()
                    self.discarding_line = True
                    self.offset = len(self.buffer)
                break
            line, self.offset = self.buffer[self.offset:newline], newline + 1
            if self.discarding_line:
                self.discarding_line = False
                continue
            if len(line) > MAX_LINE:
                self.line_too_long()
                continue
            result = self.line_received(line.rstrip(b"\r").decode("latin-1"))
            if isinstance(result, Deferred):
                self._wait_for(result)
                break
        if not self.busy and self.offset:
            self.buffer, self.offset = self.buffer[self.offset:], 0
        self._flush()

    def _take_buffer(self) -> bytes:
        """What the client sent beyond the lines already handled."""
        pending, self.buffer, self.offset = self.buffer[self.offset:], b"", 0
        return pending

    def _unread(self, data: bytes) -> None:
        """Put ``data`` (what followed the end of bulk data) back in front of the buffer."""
        self.buffer, self.offset = data + self._take_buffer(), 0

    def _wait_for(self, result: Deferred) -> None:
        """Read nothing more until a check or the queue answers, so replies keep
        their order.  Input that arrives meanwhile waits in the buffer; only a
        client that keeps sending is paused (pausing costs two epoll changes)."""
        self.busy = True
        result.addBoth(self._resume)

    def _resume(self, result) -> None:
        self.busy = False
        # The client's idle time starts when the server is done, not at its last bytes.
        self.last_activity = self.clock.seconds()
        if isinstance(result, Failure):
            log.failure("a command's handler failed", result)
            self.failed()
        if self.gone:
            return
        self._start_reading("input")
        if self.bulk is not None and len(self.buffer) > self.offset:
            self.bulk.feed(self._take_buffer())
        self._process()

    def _flush(self) -> None:
        if self.out and not self.gone:
            write_now(self.transport, b"".join(self.out))
        self.out = []

    # -- flow control ---------------------------------------------------------------------

    def _stop_reading(self, reason: str) -> None:
        if not self.reading_stopped and not self.gone:
            self.transport.pauseProducing()
        self.reading_stopped.add(reason)

    def _start_reading(self, reason: str) -> None:
        if reason not in self.reading_stopped:
            return
        self.reading_stopped.discard(reason)
        if not self.reading_stopped and not self.gone:
            self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """The client does not read its replies: read and answer nothing more."""
        self._stop_reading("output")

    def resumeProducing(self) -> None:
        self._start_reading("output")
        if not self.gone and not self.busy:
            self._process()

    def stopProducing(self) -> None:
        pass
