"""qmail-lspawn's job: local deliveries run in a child process.

A Maildir delivery is mostly system calls (open, write, fsync, rename, fsync
of new/), and in a thread of the server each of them gives the GIL up and
takes it back from the reactor thread, which serves every SMTP client.  So,
as qmail-send hands local deliveries to qmail-lspawn, the scheduler hands
them to one long-lived child process (``main`` below), which runs
qmail-local (``local.deliver``) in its own threads, on its own core.

The child reads the message from the queue file itself, as qmail-local
does; the two ends exchange one small frame per delivery: a 4-byte length,
then JSON (which carries the surrogate escapes of undecodable address bytes
unharmed).  The child reads the control files and vpasswd on its own, with
the same reload-on-change as the server.

If the child dies, the deliveries it held are deferred (retried later, as
after a crash: a delivery may repeat, none is lost) and a new child starts.
It ignores SIGINT and SIGTERM, which a terminal or a service manager sends
to the whole process group: it ends when the server closes its stdin, once
the deliveries it holds are done.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from qtwist import local
from qtwist.control import ControlWatcher, Settings
from qtwist.delivery import ILocalDelivery, Outcome
from qtwist.queue import QueuedMessage
from qtwist.users import IUserStore, open_store

log = Logger(namespace="qtwist.lspawn")

# A frame holds one delivery's request or result: a result lists the
# addresses a dot-qmail file forwards to, which for a mailing list are many.
FRAME_LIMIT = 64 * 1024 * 1024
# Seconds between a child's unexpected end and the start of the next.
RESTART_DELAY = 1.0
# Seconds a stopping child gets to finish what it holds before SIGKILL (the
# scheduler has already waited for its deliveries).
STOP_GRACE = 10.0
# Threads in the child: the scheduler's concurrencylocal is the real limit.
MAX_THREADS = 1000
# The child's main thread reads requests between the delivery threads'
# system calls; with Python's default 5 ms it may wait that long for the
# GIL, and the deliveries wait for it (about 6% fewer msgs/s).
SWITCH_INTERVAL = 0.0005
# The child imports exactly what the server did: the same sys.path, not one
# that starts with the current directory (which may hold another qtwist).
CHILD_MAIN = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
              "from qtwist.lspawn import main; main(sys.argv[2:])")
# The child frames its answers as the server's Int32StringReceiver reads them.
_LENGTH = struct.Struct(Int32StringReceiver.structFormat)
CHILD_ENDED = "Local delivery process ended during the delivery. (#4.3.0)"
NO_CHILD = "Local delivery process is restarting. (#4.3.0)"


def _encode(value: list) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class _Frames(Int32StringReceiver):
    """The server's end of the pipes: length-prefixed JSON frames."""

    MAX_LENGTH = FRAME_LIMIT

    def __init__(self, received: Callable[[list], None]) -> None:
        self.received = received

    def stringReceived(self, frame: bytes) -> None:
        self.received(json.loads(frame))

    def send(self, value: list) -> None:
        self.sendString(_encode(value))

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("lspawn: a frame of {length} bytes is over the limit; dropping the pipe", length=length)
        self.transport.loseConnection()


# -- the server's end -------------------------------------------------------------------------

class _Child(ProcessProtocol):
    """One child process and the deliveries it holds."""

    def __init__(self, ended: Callable[[_Child], None]) -> None:
        self.pending: dict[int, Deferred] = {}
        self.frames = _Frames(self._answered)
        self.gone = Deferred()
        self._ended = ended
        self._numbers = itertools.count(1)

    def connectionMade(self) -> None:
        self.frames.makeConnection(self.transport)

    def deliver(self, request: list) -> Deferred:
        number = next(self._numbers)
        answer = self.pending[number] = Deferred()
        self.frames.send([number, *request])
        return answer

    def _answered(self, reply: list) -> None:
        number, kind, text, forwards = reply
        answer = self.pending.pop(number, None)
        if answer is not None:
            answer.callback(Outcome(kind, text, tuple(forwards)))

    def outReceived(self, data: bytes) -> None:
        self.frames.dataReceived(data)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.error("lspawn: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        pending, self.pending = self.pending, {}
        for answer in pending.values():
            answer.callback(Outcome.deferral(CHILD_ENDED))
        self._ended(self)
        self.gone.callback(reason.value)


@implementer(ILocalDelivery)
class LocalSpawn:
    """The server's handle on the child; ``deliver`` is qmail-lspawn's one request."""

    def __init__(self, reactor, home: Path) -> None:
        self.reactor = reactor
        self.home = Path(home)
        self._child: _Child | None = None
        self._restart = None
        self._running = False
        self._spawn_failing = False

    def start(self) -> None:
        self._running = True
        self._spawn()

    def deliver(self, message: QueuedMessage, recipient: str) -> Deferred:
        """Deliver the queued ``message`` to the local ``recipient``: an Outcome, never an error."""
        if self._child is None:
            return succeed(Outcome.deferral(NO_CHILD))
        segment = message.segment
        return self._child.deliver([recipient, message.sender, os.fsdecode(segment.path),
                                    message.offset, message.size])

    def stop(self) -> Deferred:
        """Close the child's stdin and wait for it to end; SIGKILL after STOP_GRACE."""
        self._running = False
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        child = self._child
        if child is None:
            return succeed(None)
        child.transport.closeStdin()
        killer = self.reactor.callLater(STOP_GRACE, self._kill, child)
        child.gone.addBoth(lambda _: killer.cancel() if killer.active() else None)
        return child.gone

    def _spawn(self) -> None:
        """Start the child; on failure (out of processes or descriptors, say)
        log once while it keeps failing, and try again soon."""
        child = _Child(self._child_ended)
        argv = [sys.executable, "-c", CHILD_MAIN, json.dumps(sys.path), os.fsdecode(self.home)]
        try:
            self.reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ),
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as error:
            if not self._spawn_failing:
                log.error("lspawn: cannot start the local delivery process ({why}); trying again every "
                          "{delay} s", why=getattr(error, "strerror", None) or repr(error), delay=RESTART_DELAY)
            self._spawn_failing = True
            self._respawn()
            return
        if self._spawn_failing:
            log.info("lspawn: the local delivery process started again")
        self._spawn_failing = False
        self._child = child

    def _child_ended(self, child: _Child) -> None:
        if child is not self._child:
            return
        self._child = None
        if self._running:
            log.error("lspawn: the local delivery process ended; starting a new one in {delay} s",
                      delay=RESTART_DELAY)
        self._respawn()

    def _respawn(self) -> None:
        if self._running:
            self._restart = self.reactor.callLater(RESTART_DELAY, self._spawn)

    @staticmethod
    def _kill(child: _Child) -> None:
        log.warn("lspawn: the local delivery process outlasted the stop; killing it")
        child.transport.signalProcess("KILL")


# -- the child's end --------------------------------------------------------------------------
#
# The child is qmail-local's plain loop, not a reactor: its main thread reads
# requests and hands them to delivery threads, which write their answers
# themselves.  (A reactor here cost a third more CPU per delivery: a wake-up
# and a GIL hand-over for every request and every answer.)

class _FreshSettings:
    """The control files as the server reads them, checked for changes at most
    once a second, by whichever delivery thread comes first.  A check that
    fails keeps the last settings, says so once on stderr (the server's log),
    and is tried again a second later."""

    def __init__(self, home: Path) -> None:
        self.control = ControlWatcher(home)
        self._checked = time.monotonic()
        self._checking = threading.Lock()
        self._failing = False

    def __call__(self) -> Settings:
        now = time.monotonic()
        if now - self._checked >= self.control.interval and self._checking.acquire(blocking=False):
            try:
                self._checked = now
                self.control.poll()
                self._failing = False
            except Exception as error:
                if not self._failing:
                    print(f"looking for changed control files failed ({error!r}); "
                          f"trying again every second", file=sys.stderr, flush=True)
                self._failing = True
            finally:
                self._checking.release()
        return self.control.settings


class _Answers:
    """Answer frames onto stdout, one whole frame at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._writing = threading.Lock()

    def send(self, value: list) -> None:
        frame = _encode(value)
        data = memoryview(_LENGTH.pack(len(frame)) + frame)
        with self._writing:
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                pass  # the server is gone: it retries what it did not hear about


def _requests(fd: int) -> Iterator[list]:
    """The frames read from ``fd``, until end of file."""
    buffer = b""
    while chunk := os.read(fd, 65536):
        buffer += chunk
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if end > len(buffer):
                break
            yield json.loads(buffer[start + _LENGTH.size:end])
            start = end
        buffer = buffer[start:]


def _deliver(home: Path, settings: _FreshSettings, users: IUserStore, recipient: str, sender: str,
             queue_file: str, offset: int, size: int) -> Outcome:
    """qmail-local for one recipient, reading the message from its queue file."""
    try:
        fd = os.open(queue_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            body = os.pread(fd, size, offset)
        finally:
            os.close(fd)
    except OSError as error:
        return Outcome.deferral(f"Unable to read the queued message: {error.strerror}. (#4.3.0)")
    return local.deliver(home, settings(), users, recipient, sender, body)


def main(argv: list[str]) -> None:
    """The child: ``argv`` is [HOME]; started by LocalSpawn only.  At the end
    of stdin it lets the deliveries in progress finish and answer, then exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.setswitchinterval(SWITCH_INTERVAL)
    home = Path(argv[0])
    settings = _FreshSettings(home)
    users = open_store(home)
    answers = _Answers(sys.stdout.fileno())

    def run(number: int, *job) -> None:
        try:
            outcome = _deliver(home, settings, users, *job)
        except Exception as error:  # a bug must not lose the message: the scheduler retries
            traceback.print_exc()
            outcome = Outcome.deferral(f"Internal error: {error!r}. (#4.3.0)")
        answers.send([number, outcome.kind, outcome.text, list(outcome.forwards)])

    with ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="qtwist-local") as pool:
        for request in _requests(sys.stdin.fileno()):
            pool.submit(run, *request)
