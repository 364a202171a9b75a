"""qmail-send's job end to end: the Scheduler over the real queue, real Maildir
delivery and real SMTP delivery to a sink listening on 127.0.0.1.

Every wait polls with a deadline; the only clocks involved are the scheduler's
own (queuelifetime, the 1-second request poll)."""

from __future__ import annotations

import gc
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from math import isqrt
from pathlib import Path
from typing import Callable, TypeVar

from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from qtwist.control import load
from qtwist.lspawn import LocalSpawn
from qtwist.queue import BOUNCED, DELIVERED, FAILED, PENDING, Queue, QueuedMessage
from qtwist.queue.admin import queue_flush, queue_read, queue_remove, queue_stat
from qtwist.remote import RemoteDelivery
from qtwist.resolver import Lookups
from qtwist.send import Scheduler, log_safe, next_retry

ME = "mx.example.test"
DOMAIN = "example.test"
REMOTE = "remote.test"
DEADLINE = 10.0
MESSAGE = b"From: alice@example.test\nTo: someone\nSubject: send test\n\nhello\n.leading dot\n"
NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"

T = TypeVar("T")


# -- an SMTP sink -------------------------------------------------------------------------------

@dataclass
class Transaction:
    """One MAIL transaction as the sink saw it; ``data`` is None until the final dot."""

    sender: str
    recipients: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    data: bytes | None = None


class Sink:
    """What the SMTP sink answers and what it has seen.

    ``replies`` maps a recipient to its RCPT reply (250 when absent).
    ``hold_until_open`` keeps the reply to the final dot back until that many
    sessions are open at once, which only parallel deliveries can bring about."""

    def __init__(self) -> None:
        self.replies: dict[str, bytes] = {}
        self.transactions: list[Transaction] = []
        self.sessions: list[SinkSession] = []
        self.max_open = 0
        self.hold_until_open = 0
        self.held: list[SinkSession] = []

    def opened(self, session: SinkSession) -> None:
        self.sessions.append(session)
        self.max_open = max(self.max_open, len(self.sessions))
        self.release_if_due()

    def closed(self, session: SinkSession) -> None:
        self.sessions.remove(session)

    def release_if_due(self) -> None:
        if len(self.sessions) >= self.hold_until_open:
            self.release()

    def release(self) -> None:
        """Answer every held final dot and hold no more."""
        self.hold_until_open = 0
        held, self.held = self.held, []
        for session in held:
            session.sendLine(b"250 ok accepted")

    def delivered(self) -> list[Transaction]:
        return [t for t in self.transactions if t.data is not None]

    def abort_all(self) -> None:
        for session in list(self.sessions):
            session.transport.abortConnection()


class SinkSession(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transaction: Transaction | None = None
        self.lines: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.sink.opened(self)
        self.sendLine(b"220 sink.remote.test ESMTP")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.sink.closed(self)

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            self._data_line(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-sink.remote.test\r\n250-PIPELINING\r\n250 8BITMIME")
        elif verb == b"HELO":
            self.sendLine(b"250 sink.remote.test")
        elif verb == b"MAIL":
            self.transaction = Transaction(_angle_address(line))
            self.sink.transactions.append(self.transaction)
            self.sendLine(b"250 ok")
        elif verb == b"RCPT" and self.transaction is not None:
            address = _angle_address(line)
            reply = self.sink.replies.get(address, b"250 ok")
            self.transaction.recipients.append(address)
            if reply.startswith(b"2"):
                self.transaction.accepted.append(address)
            self.sendLine(reply)
        elif verb == b"DATA" and self.transaction is not None and self.transaction.accepted:
            self.lines = []
            self.sendLine(b"354 go ahead")
        elif verb == b"RSET":
            self.transaction = None
            self.sendLine(b"250 flushed")
        elif verb == b"QUIT":
            self.sendLine(b"221 sink.remote.test")
            self.transport.loseConnection()
        else:
            self.sendLine(b"503 bad sequence")

    def _data_line(self, line: bytes) -> None:
        assert self.lines is not None and self.transaction is not None
        if line != b".":
            self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        self.transaction.data = b"".join(piece + b"\n" for piece in self.lines)
        self.lines = None
        self.transaction = None
        if len(self.sink.sessions) < self.sink.hold_until_open:
            self.sink.held.append(self)
        else:
            self.sendLine(b"250 ok accepted")


def _angle_address(line: bytes) -> str:
    return line.split(b"<", 1)[1].split(b">", 1)[0].decode()


# -- the tests' common ground ---------------------------------------------------------------------

class SchedulerTestCase(TestCase):
    """A home with two users, an alias for postmaster, and a route to the sink."""

    def setUp(self) -> None:
        self.log_lines: list[str] = []
        self.schedulers: list[Scheduler] = []
        globalLogPublisher.addObserver(self._observe)
        self.addCleanup(globalLogPublisher.removeObserver, self._observe)
        self.sink = Sink()
        listener = reactor.listenTCP(0, Factory.forProtocol(lambda: SinkSession(self.sink)),
                                     interface="127.0.0.1")
        self.sink_port: int = listener.getHost().port
        self.addCleanup(listener.stopListening)
        self.addCleanup(self._sink_quiet)

    def _observe(self, event: dict) -> None:
        if event.get("log_namespace") == "qtwist.send":
            self.log_lines.extend(formatEvent(event).split("\n"))

    async def _sink_quiet(self) -> None:
        self.sink.abort_all()
        await self.wait_for(lambda: not self.sink.sessions, "the sink's sessions to close")

    def make_home(self, postmaster: bool = True, **controls: str) -> Path:
        home = Path(tempfile.mkdtemp(prefix="qtwist-send-"))
        self.addCleanup(shutil.rmtree, home, True)
        control = home / "control"
        control.mkdir()
        files = {"me": ME, "smtproutes": f"{REMOTE}:127.0.0.1:{self.sink_port}", **controls}
        for name, value in files.items():
            (control / name).write_text(f"{value}\n")
        domain = home / "domains" / DOMAIN
        domain.mkdir(parents=True)
        (domain / "vpasswd").write_text("alice:x:1:0:Alice:alice:NOQUOTA:\nbob:x:1:0:Bob:bob:NOQUOTA:\n")
        if postmaster:
            # qmail's ~alias: postmaster@me (a domain in locals, not a virtual domain).
            for sub in ("cur", "new", "tmp"):
                (home / "alias" / "Maildir" / sub).mkdir(parents=True)
            (home / "alias" / ".qmail-postmaster").write_text("./Maildir/\n")
        return home

    def start(self, home: Path) -> Scheduler:
        settings, errors = load(home)
        self.assertEqual(errors, [])
        remote = RemoteDelivery(reactor, lookups=Lookups(reactor, None), remote_port=self.sink_port)
        scheduler = Scheduler(Queue(home, reactor), lambda: settings, LocalSpawn(reactor, home), remote, reactor)
        scheduler.startService()
        self.schedulers.append(scheduler)
        self.addCleanup(self.stop, scheduler)
        return scheduler

    def flushed_log(self) -> list[str]:
        """The log lines so far, with what the schedulers still hold back (they
        write every few milliseconds) written out first."""
        for scheduler in self.schedulers:
            scheduler.log.flush()
        return self.log_lines

    async def stop(self, scheduler: Scheduler) -> None:
        if scheduler.running:
            await scheduler.stopService()

    async def wait_for(self, predicate: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
        """Poll every 20 ms until ``predicate`` gives something true; return it."""
        deadline = reactor.seconds() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if reactor.seconds() > deadline:
                raise AssertionError(f"gave up after {timeout:g} s waiting for {what}; "
                                     f"qmail-send log so far:\n" + "\n".join(self.log_lines))
            await task.deferLater(reactor, 0.02, lambda: None)

    async def send(self, scheduler: Scheduler, sender: str, recipients: list[str],
                   body: bytes = MESSAGE) -> QueuedMessage:
        """What qmail-smtpd + qmail-queue do: queue durably, then hand it to qmail-send."""
        message = await self.accept(scheduler, sender, recipients, body)
        scheduler.submit(message)
        return message

    async def accept(self, scheduler: Scheduler, sender: str, recipients: list[str],
                     body: bytes = MESSAGE) -> QueuedMessage:
        return await scheduler.queue.accept(sender, recipients, body)

    def log_match(self, pattern: str) -> re.Match | None:
        """The first qmail-send log line matching ``pattern`` in full."""
        compiled = re.compile(pattern)
        return next((m for m in map(compiled.fullmatch, self.flushed_log()) if m), None)

    def log_index(self, pattern: str) -> int:
        compiled = re.compile(pattern)
        for index, line in enumerate(self.flushed_log()):
            if compiled.fullmatch(line):
                return index
        raise AssertionError(f"no qmail-send log line matches {pattern!r}:\n" + "\n".join(self.log_lines))

    async def until_ended(self, home: Path, *messages: QueuedMessage) -> None:
        """qmail-send said ``end msg N`` for these and for every other message it
        logged as new (bounces, forwards), and nothing is left in the queue on disk."""
        for message in messages:
            await self.wait_for(lambda: self.log_match(f"end msg {message.id}"), f"end msg {message.id}")
        await self.wait_for(lambda: not self.unfinished(), "every new msg to end")
        await self.wait_for(lambda: queue_stat(home) == (0, 0), "an empty queue")

    def unfinished(self) -> set[str]:
        """Messages logged as new but neither ended nor removed."""
        pattern = re.compile(r"(new|end|removed) msg (\d+)( by request)?")
        seen: dict[str, set[str]] = {"new": set(), "end": set(), "removed": set()}
        for match in map(pattern.fullmatch, self.flushed_log()):
            if match:
                seen[match.group(1)].add(match.group(2))
        return seen["new"] - seen["end"] - seen["removed"]

    async def until_deferred(self, message: QueuedMessage) -> None:
        """qmail-send logged a deferral for one of the message's deliveries."""
        starts = re.compile(rf"starting delivery (\d+): msg {message.id} to .*")

        def deferred() -> bool:
            numbers = {m.group(1) for m in map(starts.fullmatch, self.flushed_log()) if m}
            return any(self.log_match(rf"delivery {number}: deferral: .*") for number in numbers)
        await self.wait_for(deferred, f"a deferral of msg {message.id}")

    async def stored_deferral(self, home: Path, message: QueuedMessage, index: int) -> QueuedMessage:
        """The message as the queue on disk holds it, once recipient ``index`` has a retry time."""
        def on_disk() -> QueuedMessage | None:
            stored = [m for m in queue_read(home) if m.id == message.id]
            return stored[0] if stored and stored[0].recipients[index].next_try else None
        return await self.wait_for(on_disk, f"the deferral of msg {message.id} on disk")


def mailbox(home: Path, user: str) -> list[bytes]:
    """The messages in a vpasswd user's Maildir new/, oldest name first."""
    return _maildir(home / "domains" / DOMAIN / user / "Maildir")


def postmaster_box(home: Path) -> list[bytes]:
    return _maildir(home / "alias" / "Maildir")


def _maildir(maildir: Path) -> list[bytes]:
    try:
        names = sorted(p.name for p in (maildir / "new").iterdir())
    except FileNotFoundError:
        return []
    return [(maildir / "new" / name).read_bytes() for name in names]


def as_stored(sender: str, recipient: str, body: bytes = MESSAGE) -> bytes:
    """The message as qmail-local leaves it in a Maildir."""
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode() + body


# -- local delivery ---------------------------------------------------------------------------------

class LocalDeliveryTests(SchedulerTestCase):
    async def test_local_message_lands_in_maildir_and_leaves_the_queue(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        message = await self.send(scheduler, "carol@remote.test", ["alice@example.test"])
        await self.until_ended(home, message)
        self.assertEqual(mailbox(home, "alice"), [as_stored("carol@remote.test", "alice@example.test")])
        self.assertEqual(self.sink.transactions, [])

    async def test_unknown_local_user_bounces_to_local_sender(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        message = await self.send(scheduler, "alice@example.test", ["nobody@example.test"])
        await self.until_ended(home, message)
        (notice,) = await self.wait_for(lambda: mailbox(home, "alice"), "the bounce in alice's Maildir")
        head, _, original = notice.partition(b"\n--- Below this line is a copy of the message.\n\n")
        self.assertTrue(head.startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n"), head)
        self.assertIn(f"\nFrom: MAILER-DAEMON@{ME}\n".encode(), head)
        self.assertIn(b"\nTo: alice@example.test\nSubject: failure notice\n", head)
        self.assertIn(f"\nHi. This is the qmail-send program at {ME}.\n".encode(), head)
        self.assertIn(f"\n<nobody@example.test>:\n{NO_MAILBOX}\n".encode(), head)
        self.assertEqual(original, b"Return-Path: <alice@example.test>\n" + MESSAGE)

    async def test_unknown_local_user_bounces_to_remote_sender_from_null_sender(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        message = await self.send(scheduler, "carol@remote.test", ["nobody@example.test"])
        (notice,) = await self.wait_for(self.sink.delivered, "the bounce at the sink")
        self.assertEqual((notice.sender, notice.recipients), ("", ["carol@remote.test"]))
        assert notice.data is not None
        self.assertIn(f"Hi. This is the qmail-send program at {ME}.\n".encode(), notice.data)
        self.assertIn(f"<nobody@example.test>:\n{NO_MAILBOX}\n".encode(), notice.data)
        self.assertTrue(notice.data.endswith(b"\n--- Below this line is a copy of the message.\n\n"
                                             b"Return-Path: <carol@remote.test>\n" + MESSAGE))
        await self.until_ended(home, message)
        self.assertIsNotNone(self.log_match(rf"bounce msg {message.id} qp \d+"))

    async def test_failed_bounce_becomes_double_bounce_to_postmaster(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        message = await self.send(scheduler, "", ["nobody@example.test"])
        (notice,) = await self.wait_for(lambda: postmaster_box(home), "the double bounce for postmaster")
        head, _, original = notice.partition(b"\n--- Below this line is the original bounce.\n\n")
        self.assertTrue(head.startswith(f"Return-Path: <#@[]>\nDelivered-To: postmaster@{ME}\n".encode()), head)
        self.assertIn(b"I tried to deliver a bounce message to this address, but the bounce bounced!\n", head)
        self.assertIn(f"<nobody@example.test>:\n{NO_MAILBOX}\n".encode(), head)
        self.assertEqual(original, b"Return-Path: <>\n" + MESSAGE)
        await self.until_ended(home, message)

    async def test_failed_double_bounce_is_discarded_and_logged(self) -> None:
        home = self.make_home(postmaster=False)
        scheduler = self.start(home)
        message = await self.send(scheduler, "", ["nobody@example.test"])
        double = await self.wait_for(lambda: self.log_match(rf"bounce msg {message.id} qp (\d+)"),
                                     "the double bounce")
        await self.wait_for(lambda: self.log_match(f"triple bounce: discarding msg {double.group(1)}"),
                            "the triple bounce to be discarded")
        await self.until_ended(home, message)
        self.assertIsNone(self.log_match(rf"bounce msg {double.group(1)} qp \d+"))
        self.assertEqual(self.sink.transactions, [])

    async def test_dot_qmail_forward_queues_a_new_message_that_arrives(self) -> None:
        home = self.make_home()
        (home / "domains" / DOMAIN / ".qmail-fwd").write_text("&bob@example.test\n")
        scheduler = self.start(home)
        message = await self.send(scheduler, "carol@remote.test", ["fwd@example.test"])
        (forwarded,) = await self.wait_for(lambda: mailbox(home, "bob"), "the forward in bob's Maildir")
        self.assertEqual(forwarded, as_stored("carol@remote.test", "bob@example.test",
                                              b"Delivered-To: fwd@example.test\n" + MESSAGE))
        start = self.log_match(rf"starting delivery (\d+): msg {message.id} to local fwd@example.test")
        assert start is not None
        self.assertIsNotNone(self.log_match(rf"delivery {start.group(1)}: success: did.0\+1\+0/"))
        self.assertIsNone(self.log_match(rf"bounce msg {message.id} qp \d+"))
        new_messages = [m.group(1) for m in map(re.compile(r"new msg (\d+)").fullmatch, self.flushed_log()) if m]
        self.assertEqual(len(new_messages), 2)
        await self.until_ended(home, message)
        self.assertEqual(mailbox(home, "fwd"), [])

    async def test_local_deferral_waits_for_the_local_schedule_then_flush(self) -> None:
        home = self.make_home()
        dot_qmail = home / "domains" / DOMAIN / ".qmail-slow"
        dot_qmail.write_text("&bob@example.test\n")
        dot_qmail.chmod(0o666)  # qmail-local defers rather than trust a world-writable .qmail
        scheduler = self.start(home)
        message = await self.send(scheduler, "carol@remote.test", ["slow@example.test"])
        await self.until_deferred(message)
        self.assertIsNotNone(self.log_match(r"delivery 1: deferral: Uh-oh:_.qmail_file_is_writable._\(#4.7.0\)/"))
        stored = await self.stored_deferral(home, message, 0)
        self.assertEqual(stored.recipients[0].next_try, next_retry(stored.born, stored.born, "local"))
        self.assertEqual(stored.recipients[0].next_try, stored.born + 100)

        dot_qmail.chmod(0o644)
        queue_flush(home)
        await self.wait_for(lambda: mailbox(home, "bob"), "the retried forward in bob's Maildir")
        await self.until_ended(home, message)


# -- remote delivery ----------------------------------------------------------------------------------

class RemoteDeliveryTests(SchedulerTestCase):
    def test_retry_schedule_is_qmails(self) -> None:
        born = 1_700_000_000.0
        for age in (0, 1, 99, 100, 399, 400, 3599, 86_400, 604_800):
            self.assertEqual(next_retry(born, born + age, "remote"), born + (isqrt(age) + 20) ** 2)
            self.assertEqual(next_retry(born, born + age, "local"), born + (isqrt(age) + 10) ** 2)

    async def test_recipients_of_one_domain_share_one_transaction(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        recipients = ["a@remote.test", "b@remote.test", "c@remote.test"]
        message = await self.send(scheduler, "alice@example.test", recipients)
        await self.until_ended(home, message)
        (transaction,) = self.sink.transactions
        self.assertEqual((transaction.sender, transaction.recipients, transaction.data),
                         ("alice@example.test", recipients, MESSAGE))
        for address in recipients:
            self.assertIsNotNone(self.log_match(rf"starting delivery \d+: msg {message.id} to remote {address}"))

    async def test_mixed_replies_deliver_bounce_and_defer_until_flush(self) -> None:
        home = self.make_home()
        self.sink.replies = {"bad@remote.test": b"550 no such user here", "later@remote.test": b"451 try later"}
        scheduler = self.start(home)
        recipients = ["ok@remote.test", "bad@remote.test", "later@remote.test"]
        message = await self.send(scheduler, "alice@example.test", recipients)
        await self.until_deferred(message)
        (first,) = self.sink.transactions
        self.assertEqual((first.recipients, first.accepted, first.data), (recipients, ["ok@remote.test"], MESSAGE))
        (notice,) = await self.wait_for(lambda: mailbox(home, "alice"), "the bounce for bad@, at once")
        self.assertIn(b"<bad@remote.test>:\n", notice)
        stored = await self.wait_for(lambda: [m for m in queue_read(home) if m.id == message.id
                                              and m.recipients[1].state == BOUNCED], "the bounce noted")
        stored = stored[0]
        self.assertEqual([r.state for r in stored.recipients], [DELIVERED, BOUNCED, PENDING])
        self.assertEqual(stored.recipients[2].next_try, next_retry(stored.born, stored.born, "remote"))
        self.assertEqual(stored.recipients[2].next_try, stored.born + 400)

        del self.sink.replies["later@remote.test"]
        queue_flush(home)
        await self.wait_for(lambda: len(self.sink.delivered()) == 2, "the retry after queue flush")
        self.assertEqual(self.sink.transactions[1].recipients, ["later@remote.test"])
        await self.until_ended(home, message)
        (notice,) = await self.wait_for(lambda: mailbox(home, "alice"), "the bounce for bad@")
        self.assertIn(b"<bad@remote.test>:\n127.0.0.1 does not like recipient.\n"
                      b"Remote host said: 550 no such user here\n", notice)
        self.assertNotIn(b"<ok@remote.test>", notice)
        self.assertNotIn(b"<later@remote.test>", notice)

    async def test_permanent_failure_bounces_while_a_sibling_is_deferred(self) -> None:
        home = self.make_home()
        self.sink.replies = {"bad@remote.test": b"550 no such user here", "later@remote.test": b"451 try later"}
        scheduler = self.start(home)
        message = await self.send(scheduler, "alice@example.test", ["bad@remote.test", "later@remote.test"])
        await self.until_deferred(message)
        (notice,) = await self.wait_for(lambda: mailbox(home, "alice"), "the bounce for bad@", timeout=3)
        self.assertIn(b"<bad@remote.test>:\n", notice)

    async def test_queuelifetime_gives_up_on_the_next_attempt(self) -> None:
        home = self.make_home(queuelifetime="1")
        self.sink.replies = {"later@remote.test": b"451 mailbox busy"}
        scheduler = self.start(home)
        message = await self.send(scheduler, "alice@example.test", ["later@remote.test"])
        await self.until_ended(home, message)
        self.assertEqual([t.recipients for t in self.sink.transactions], [["later@remote.test"]] * 2)
        self.assertIsNotNone(self.log_match(r"delivery 1: deferral: .*451_mailbox_busy.*"))
        self.assertLess(self.log_index(r"starting delivery 2: .*"), self.log_index(rf"bounce msg {message.id} qp \d+"))
        (notice,) = await self.wait_for(lambda: mailbox(home, "alice"), "the bounce")
        self.assertIn(b"<later@remote.test>:\n127.0.0.1 does not like recipient.\n"
                      b"Remote host said: 451 mailbox busy\n", notice)
        self.assertIn(b"I'm not going to try again; this message has been in the queue too long.", notice)

    async def test_attempt_after_queuelifetime_is_logged_as_failure(self) -> None:
        home = self.make_home(queuelifetime="1")
        self.sink.replies = {"later@remote.test": b"451 mailbox busy"}
        scheduler = self.start(home)
        message = await self.send(scheduler, "alice@example.test", ["later@remote.test"])
        await self.until_ended(home, message)
        self.assertIsNotNone(self.log_match(
            r"delivery 2: failure: .*451.mailbox.busy.*/I'm.not.going.to.try.again;.this.message.has.been."
            r"in.the.queue.too.long\./?"))


# -- concurrency --------------------------------------------------------------------------------------

class ConcurrencyTests(SchedulerTestCase):
    async def submit_all(self, scheduler: Scheduler, recipient: str, count: int) -> list[QueuedMessage]:
        """Queue ``count`` messages first, then hand them over in one go, as a busy
        SMTP server would, so the scheduler could start them all at once."""
        messages = [await self.accept(scheduler, "carol@remote.test", [recipient]) for _ in range(count)]
        for message in messages:
            scheduler.submit(message)
        return messages

    def busiest(self, channel: str) -> int:
        pattern = re.compile(r"status: local (\d+)/\d+ remote (\d+)/\d+")
        counts = [int(m.group(1 if channel == "local" else 2))
                  for m in map(pattern.fullmatch, self.flushed_log()) if m]
        return max(counts, default=0)

    async def test_concurrencyremote_one_means_one_connection_at_a_time(self) -> None:
        home = self.make_home(concurrencyremote="1")
        scheduler = self.start(home)
        messages = await self.submit_all(scheduler, "x@remote.test", 3)
        await self.until_ended(home, *messages)
        self.assertEqual(len(self.sink.delivered()), 3)
        self.assertEqual(self.sink.max_open, 1)
        self.assertEqual(self.busiest("remote"), 1)
        self.assertIsNotNone(self.log_match(r"status: local 0/10 remote 1/1"))

    async def test_remote_deliveries_run_in_parallel_below_concurrencyremote(self) -> None:
        home = self.make_home()
        self.sink.hold_until_open = 3
        scheduler = self.start(home)
        messages = await self.submit_all(scheduler, "x@remote.test", 3)
        await self.until_ended(home, *messages)
        self.assertEqual(self.sink.max_open, 3)

    async def test_concurrencylocal_one_means_one_local_delivery_at_a_time(self) -> None:
        home = self.make_home(concurrencylocal="1")
        scheduler = self.start(home)
        messages = await self.submit_all(scheduler, "alice@example.test", 4)
        await self.until_ended(home, *messages)
        self.assertEqual(len(mailbox(home, "alice")), 4)
        self.assertEqual(self.busiest("local"), 1)

    async def test_local_deliveries_run_in_parallel_below_concurrencylocal(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        messages = await self.submit_all(scheduler, "alice@example.test", 4)
        await self.until_ended(home, *messages)
        self.assertEqual(len(mailbox(home, "alice")), 4)
        self.assertEqual(self.busiest("local"), 4)


# -- restart and removal ----------------------------------------------------------------------------

class RestartTests(SchedulerTestCase):
    async def test_deferred_delivery_resumes_after_restart_and_flush(self) -> None:
        home = self.make_home()
        self.sink.replies = {"later@remote.test": b"451 try later"}
        first = self.start(home)
        message = await self.send(first, "alice@example.test", ["later@remote.test"])
        await self.until_deferred(message)
        await first.stopService()
        self.assertEqual(queue_stat(home), (1, 0))

        self.sink.replies.clear()
        self.start(home)
        queue_flush(home)
        await self.wait_for(self.sink.delivered, "the resumed delivery")
        await self.until_ended(home, message)
        self.assertEqual([t.recipients for t in self.sink.transactions], [["later@remote.test"]] * 2)
        self.assertEqual(mailbox(home, "alice"), [])

    async def test_stop_waits_for_a_delivery_in_progress(self) -> None:
        home = self.make_home()
        self.sink.hold_until_open = 2  # a lone delivery: the reply to its final dot waits
        scheduler = self.start(home)
        await self.send(scheduler, "alice@example.test", ["x@remote.test"])
        await self.wait_for(lambda: self.sink.held, "the delivery to reach its final dot")
        stopped = scheduler.stopService()
        self.sink.release()
        try:
            await stopped
        finally:
            await self.wait_for(lambda: not self.sink.sessions, "the connection to close")
            gc.collect()  # an unhandled failure in the scheduler is reported in this test
        pending = [m.id for m in queue_read(home) if any(r.state == PENDING for r in m.recipients)]
        self.assertEqual(pending, [])
        self.assertIsNotNone(self.log_match(r"delivery \d+: success: .*"))
        self.assertEqual(len(self.sink.delivered()), 1)

    async def test_message_resolved_but_not_ended_is_finished_at_start(self) -> None:
        home = self.make_home()
        # A crash between the last result record and the end record.
        queue = Queue(home, reactor)
        queue.open()
        message = await queue.accept("alice@example.test", ["gone@remote.test",
                                                            "ok@remote.test"], MESSAGE)
        gone, ok = message.recipients
        gone.state, gone.text = FAILED, "127.0.0.1 does not like recipient.\nRemote host said: 550 gone"
        queue.record_result(message, 0)
        ok.state, ok.text = DELIVERED, "127.0.0.1 accepted message.\nRemote host said: 250 ok"
        queue.record_result(message, 1)
        await queue.close()

        self.start(home)
        (notice,) = await self.wait_for(lambda: mailbox(home, "alice"), "the bounce made at start")
        self.assertIn(b"<gone@remote.test>:\n127.0.0.1 does not like recipient.\n"
                      b"Remote host said: 550 gone\n", notice)
        self.assertNotIn(b"<ok@remote.test>", notice)
        await self.until_ended(home, message)
        self.assertEqual(self.sink.transactions, [])

    async def test_queue_rm_while_running_ends_the_message_undelivered(self) -> None:
        home = self.make_home()
        self.sink.replies = {"later@remote.test": b"451 try later"}
        scheduler = self.start(home)
        message = await self.send(scheduler, "alice@example.test", ["later@remote.test"])
        await self.until_deferred(message)

        removed = await deferToThread(queue_remove, home, [str(message.id)], None, wait=10)
        self.assertEqual(removed, 1)
        await self.wait_for(lambda: self.log_match(f"removed msg {message.id} by request"), "the removal")
        await self.wait_for(lambda: queue_stat(home) == (0, 0), "an empty queue")

        self.sink.replies.clear()
        queue_flush(home)
        await self.wait_for(lambda: self.log_match("flush: retrying every deferred delivery now"), "the flush")
        self.assertEqual(scheduler.in_progress, {"local": 0, "remote": 0})
        self.assertEqual(len(self.sink.transactions), 1)
        self.assertEqual(self.sink.delivered(), [])
        self.assertEqual(len([line for line in self.flushed_log() if line.startswith("starting delivery")]), 1)
        self.assertEqual(mailbox(home, "alice"), [])


# -- the log ------------------------------------------------------------------------------------------

class LogTests(SchedulerTestCase):
    async def test_qmail_send_log_lines(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        delivered = await self.send(scheduler, "carol@remote.test", ["alice@example.test"])
        await self.until_ended(home, delivered)
        n = delivered.id
        info = rf"info msg {n}: bytes {len(MESSAGE)} from <carol@remote.test> qp \d+ uid \d+"
        start = rf"starting delivery (\d+): msg {n} to local alice@example.test"
        order = [self.log_index(f"new msg {n}"), self.log_index(info), self.log_index(start),
                 self.log_index(r"status: local 1/10 remote 0/20")]
        number = self.log_match(start).group(1)
        order += [self.log_index(rf"delivery {number}: success: .*"),
                  self.log_index(r"status: local 0/10 remote 0/20"), self.log_index(f"end msg {n}")]
        self.assertEqual(order, sorted(order))

        bounced = await self.send(scheduler, "carol@remote.test", ["nobody@example.test"])
        await self.until_ended(home, bounced)
        start = self.log_match(rf"starting delivery (\d+): msg {bounced.id} to local nobody@example.test")
        self.assertIsNotNone(self.log_match(rf"delivery {start.group(1)}: failure: .*#5\.1\.1.*"))
        qp = self.log_match(rf"bounce msg {bounced.id} qp (\d+)").group(1)
        self.assertLess(self.log_index(rf"bounce msg {bounced.id} qp {qp}"), self.log_index(f"end msg {bounced.id}"))
        self.assertIsNotNone(self.log_match(rf"starting delivery \d+: msg {qp} to remote carol@remote.test"))
        self.assertIsNotNone(self.log_match(rf"info msg {qp}: bytes \d+ from <> qp \d+ uid \d+"))

    async def test_delivery_report_is_logged_as_qmail_does(self) -> None:
        home = self.make_home()
        scheduler = self.start(home)
        message = await self.send(scheduler, "carol@remote.test", ["alice@example.test", "x@remote.test"])
        await self.until_ended(home, message)
        self.assertIsNotNone(self.log_match(r"delivery \d+: success: did_1\+0\+0/"))
        self.assertIsNotNone(self.log_match(
            r"delivery \d+: success: 127\.0\.0\.1_accepted_message\./Remote_host_said:_250_ok_accepted/"))
        self.assertEqual(log_safe("a%b c\td\xe9\n"), "a_b_c_d_/")
