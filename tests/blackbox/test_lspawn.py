"""qmail-lspawn's child: local deliveries in a process of their own.

The tests run the real child against a real queue and real Maildirs.  A
delivery is held in progress by a dot-qmail program that blocks on a FIFO
until the test writes a line into it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from qtwist import lspawn
from qtwist.lspawn import LocalSpawn
from qtwist.queue import Queue, QueuedMessage
from qtwist.users import UserDB
from tests.support.home import make_home
from tests.support.server import Server
from tests.support.waiting import DEADLINE, wait_until

DOMAIN = "example.test"
MESSAGE = b"From: carol@remote.test\nSubject: lspawn\n\nhello\n"

T = TypeVar("T")


class LocalSpawnTests(TestCase):
    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="qtwist-lspawn-"))
        self.addCleanup(shutil.rmtree, self.home, True)
        make_home(self.home, controls={"dotqmailprograms": "1\n"})
        self.fifo = self.home / "release"
        os.mkfifo(self.fifo)
        self.started = self.home / "started"
        hold = self.home / "domains" / DOMAIN / ".qmail-hold"
        hold.write_text(f"|touch {self.started}; read line < {self.fifo}\n")
        hold.chmod(0o644)
        self.queue = Queue(self.home, reactor)
        self.queue.open(1000)
        self.addCleanup(self.queue.close)
        self.spawn = LocalSpawn(reactor, self.home)
        self.spawn.start()
        self.addCleanup(self.spawn.stop)
        # A program still blocked at the end is let go, so no process outlives the test.
        self.addCleanup(self.release)

    def release(self) -> bool:
        """Let a held program go; False while no program waits on the FIFO yet."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return False
            raise
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        return True

    async def wait_for(self, predicate: Callable[[], T], what: str) -> T:
        deadline = reactor.seconds() + DEADLINE
        while not (result := predicate()):
            if reactor.seconds() > deadline:
                raise AssertionError(f"gave up after {DEADLINE:g} s waiting for {what}")
            await task.deferLater(reactor, 0.02, lambda: None)
        return result

    async def queued(self, sender: str = "carol@remote.test") -> QueuedMessage:
        return await self.queue.accept(sender, [f"alice@{DOMAIN}"], MESSAGE)

    def child_pid(self) -> int | None:
        child = self.spawn._child
        return None if child is None else child.transport.pid

    def mailbox(self, user: str = "alice") -> list[bytes]:
        new = self.home / "domains" / DOMAIN / user / "Maildir" / "new"
        return [path.read_bytes() for path in sorted(new.iterdir())] if new.exists() else []

    async def test_delivery_in_the_child_lands_in_the_maildir(self) -> None:
        message = await self.queued()
        outcome = await self.spawn.deliver(message, f"alice@{DOMAIN}")
        self.assertEqual((outcome.kind, outcome.text), ("success", "did 1+0+0\n"))
        self.assertEqual(self.mailbox(),
                         [b"Return-Path: <carol@remote.test>\nDelivered-To: alice@example.test\n" + MESSAGE])
        self.assertNotEqual(self.child_pid(), os.getpid())

    async def test_undecodable_address_bytes_reach_the_mailbox_unchanged(self) -> None:
        sender = b"caf\xe9@remote.test".decode("utf-8", "surrogateescape")
        message = await self.queued(sender)
        outcome = await self.spawn.deliver(message, f"alice@{DOMAIN}")
        self.assertEqual(outcome.kind, "success")
        (stored,) = self.mailbox()
        self.assertTrue(stored.startswith(b"Return-Path: <caf\xe9@remote.test>\n"), stored[:60])

    async def test_a_domain_added_while_running_is_delivered_to(self) -> None:
        message = await self.queued()
        outcome = await self.spawn.deliver(message, "dan@new.test")
        self.assertEqual(outcome.kind, "failure")
        users = UserDB(self.home)
        users.add_domain("new.test")
        users.add_user("dan@new.test", "secret-Passw0rd")
        # The child looks at the control files and domains/ about once a second.
        deadline = reactor.seconds() + DEADLINE
        while (outcome := await self.spawn.deliver(message, "dan@new.test")).kind != "success":
            self.assertLess(reactor.seconds(), deadline, f"still {outcome}")
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(list((self.home / "domains" / "new.test" / "dan" / "Maildir" / "new").iterdir())), 1)

    async def test_forwards_come_back_to_the_server(self) -> None:
        addresses = [f"member{number}@lists.test" for number in range(3000)]
        forward = self.home / "domains" / DOMAIN / ".qmail-list"
        forward.write_text("".join(f"&{address}\n" for address in addresses))
        forward.chmod(0o644)
        message = await self.queued()
        outcome = await self.spawn.deliver(message, f"list@{DOMAIN}")
        self.assertEqual(outcome.kind, "success")
        self.assertEqual(list(outcome.forwards), addresses)

    async def test_a_killed_child_defers_what_it_held_and_is_replaced(self) -> None:
        message = await self.queued()
        held = self.spawn.deliver(message, f"hold@{DOMAIN}")
        await self.wait_for(self.started.exists, "the held program to start")
        first = self.child_pid()
        os.kill(first, signal.SIGKILL)
        outcome = await held
        self.assertEqual((outcome.kind, outcome.text), ("deferral", lspawn.CHILD_ENDED))
        await self.wait_for(lambda: self.child_pid() not in (None, first), "a new child")
        outcome = await self.spawn.deliver(message, f"alice@{DOMAIN}")
        self.assertEqual(outcome.kind, "success")
        self.assertEqual(len(self.mailbox()), 1)

    async def test_a_child_that_cannot_be_started_is_tried_again(self) -> None:
        class OutOfProcesses:
            """The reactor, but its first spawnProcess fails as fork() does when out of processes."""

            def __init__(self) -> None:
                self.failed = False

            def spawnProcess(self, *args, **kwargs):
                if not self.failed:
                    self.failed = True
                    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
                return reactor.spawnProcess(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(reactor, name)

        spawn = LocalSpawn(OutOfProcesses(), self.home)
        spawn.start()
        self.addCleanup(spawn.stop)
        message = await self.queued()
        outcome = await spawn.deliver(message, f"alice@{DOMAIN}")
        self.assertEqual((outcome.kind, outcome.text), ("deferral", lspawn.NO_CHILD))
        await self.wait_for(lambda: spawn._child is not None, "the second try to start the child")
        outcome = await spawn.deliver(message, f"alice@{DOMAIN}")
        self.assertEqual(outcome.kind, "success")

    async def test_interrupt_and_terminate_signals_leave_the_child_running(self) -> None:
        pid = self.child_pid()
        message = await self.queued()
        # An answer proves the child is up with its signal handling in place.
        await self.spawn.deliver(message, f"alice@{DOMAIN}")
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        outcome = await self.spawn.deliver(message, f"bob@{DOMAIN}")
        self.assertEqual(outcome.kind, "success")
        self.assertEqual(self.child_pid(), pid)

    async def test_stop_lets_a_delivery_in_progress_finish_and_answer(self) -> None:
        message = await self.queued()
        held = self.spawn.deliver(message, f"hold@{DOMAIN}")
        await self.wait_for(self.started.exists, "the held program to start")
        stopped = self.spawn.stop()
        self.assertFalse(stopped.called)
        await self.wait_for(self.release, "the held program to read the FIFO")
        outcome = await held
        self.assertEqual((outcome.kind, outcome.text), ("success", "did 0+0+1\n"))
        await stopped
        self.assertIsNone(self.child_pid())


def test_the_child_ends_when_the_server_is_killed(tmp_path: Path) -> None:
    """kill -9 of the server closes the child's stdin: the child ends by itself."""
    server = Server(make_home(tmp_path / "home")).start()
    try:
        (child,) = wait_until(lambda: _children(server.process.pid), "the local delivery process")
        server.kill()
        wait_until(lambda: not _alive(child), "the local delivery process to end")
    finally:
        server.stop()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(parent: int) -> list[int]:
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return [pid for pid in pids if (fields := _stat(pid)) is not None and fields[1] == str(parent)]


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as ended)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"
