"""qmail-send's job: routing, retries, queuelifetime, bounces and concurrency,
driven on a ``task.Clock`` over the real queue, with delivery channels the
test answers (tests/support/memory.py), so hours of retries take no time.
A few tests at the end run the real channels (the qmail-lspawn child, SMTP
to the fake server) end to end."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from math import isqrt
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from qtwist.bounce import DOUBLE_BOUNCE_SENDER, GIVING_UP
from qtwist.control import load
from qtwist.delivery import Outcome
from qtwist.lspawn import LocalSpawn
from qtwist.queue import BOUNCED, DELIVERED, PENDING, Queue, QueuedMessage
from qtwist.queue.admin import queue_flush, queue_read, queue_remove, queue_stat
from qtwist.remote import RemoteDelivery
from qtwist.resolver import Lookups
from qtwist.send import Scheduler, log_safe, next_retry
from tests.support.fakesmtp import FakeSMTP, Script
from tests.support.home import DOMAIN, ME, edit_file, make_home
from tests.support.memory import MemoryHome, SchedulerRig, wait_for

MESSAGE = b"From: alice@example.test\nSubject: send test\n\nhello\n.leading dot\n"
ALICE = f"alice@{DOMAIN}"
LATER = Outcome.deferral("Connected to 192.0.2.1 but greeting failed.\nRemote host said: 451 try later")
GONE = Outcome.failure("192.0.2.1 does not like recipient.\nRemote host said: 550 no such user")
DONE = Outcome.success("192.0.2.1 accepted message.\nRemote host said: 250 ok")


class SchedulerTestCase(TestCase):
    """A home (example.test local with alice and bob, postmaster@me an
    alias), its scheduler on a Clock, and the qmail-send log lines."""

    controls: dict[str, str] = {}

    def setUp(self) -> None:
        path = Path(tempfile.mkdtemp(prefix="qtwist-send-"))
        self.addCleanup(shutil.rmtree, path, True)
        make_home(path, controls=self.controls)
        self.home = MemoryHome(path)
        self.rig = SchedulerRig(self.home).start()
        self.addCleanup(self.rig.stop)
        self.log_lines: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        self.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict) -> None:
        if event.get("log_namespace") == "qtwist.send":
            self.log_lines.extend(formatEvent(event).split("\n"))

    @property
    def clock(self):
        return self.rig.clock

    def log(self) -> list[str]:
        """The qmail-send lines so far (the scheduler writes them every 50 ms)."""
        self.rig.scheduler.log.flush()
        return self.log_lines

    def logged(self, pattern: str) -> re.Match | None:
        compiled = re.compile(pattern)
        return next((m for m in map(compiled.fullmatch, self.log()) if m), None)

    def control(self, name: str, text: str) -> None:
        edit_file(self.home.path / "control" / name, text)
        self.home.reload()

    async def send(self, sender: str, recipients: list[str], body: bytes = MESSAGE) -> QueuedMessage:
        return await self.rig.send(sender, recipients, body)

    async def answer(self, channel, *outcomes: Outcome) -> list[str]:
        """Answer the one waiting delivery of ``channel``; returns its recipients."""
        attempt = await channel.take()
        attempt.answer(*outcomes)
        await self.rig.settled()
        return attempt.recipients

    def on_disk(self, message: QueuedMessage) -> QueuedMessage:
        """The message as the queue on disk holds it."""
        (stored,) = [m for m in queue_read(self.home.path) if m.id == message.id]
        return stored

    def bounces(self) -> list[QueuedMessage]:
        """Messages the scheduler queued itself from a bounce sender."""
        return [m for m in self.rig.queue.messages.values() if m.sender in ("", DOUBLE_BOUNCE_SENDER)]


# -- routing ------------------------------------------------------------------------------------

class RoutingTests(SchedulerTestCase):
    async def test_local_and_remote_recipients_go_to_their_channels(self) -> None:
        await self.send("carol@remote.test", [ALICE, "x@remote.test", f"bob@{DOMAIN}"])
        self.assertEqual(sorted(a.recipients[0] for a in self.rig.local.waiting), [ALICE, f"bob@{DOMAIN}"])
        self.assertEqual([a.recipients for a in self.rig.remote.waiting], [["x@remote.test"]])

    async def test_recipients_of_one_remote_domain_share_one_delivery(self) -> None:
        await self.send(ALICE, ["a@remote.test", "b@other.test", "c@remote.test"])
        groups = sorted(a.recipients for a in self.rig.remote.waiting)
        self.assertEqual(groups, [["a@remote.test", "c@remote.test"], ["b@other.test"]])

    async def test_routing_is_decided_after_queueing_by_the_control_files_then_in_force(self) -> None:
        message = await self.rig.queue.accept("carol@remote.test", ["x@new.test"], MESSAGE)
        (self.home.path / "domains" / "new.test").mkdir()  # a domain added after the message was queued
        self.home.reload()
        self.rig.scheduler.submit(message)
        self.assertEqual(self.rig.remote.waiting, [])
        self.assertEqual((await self.rig.local.take()).recipients, ["x@new.test"])

    async def test_delivered_message_leaves_the_queue_and_the_log_shows_qmail_sends_lines(self) -> None:
        message = await self.send("carol@remote.test", [ALICE])
        await self.answer(self.rig.local, Outcome.success("did 1+0+0\n"))
        await wait_for(lambda: message.id not in self.rig.queue.messages, "the message to end")
        n = message.id
        lines = [rf"new msg {n}", rf"info msg {n}: bytes {len(MESSAGE)} from <carol@remote.test> qp {n} uid 0",
                 rf"starting delivery 1: msg {n} to local {ALICE}", r"status: local 1/10 remote 0/20",
                 r"delivery 1: success: did_1\+0\+0/", r"status: local 0/10 remote 0/20", rf"end msg {n}"]
        positions = [next(i for i, line in enumerate(self.log()) if re.fullmatch(p, line)) for p in lines]
        self.assertEqual(positions, sorted(positions))
        self.assertEqual(queue_stat(self.home.path), (0, 0))


    async def test_addresses_reach_the_log_as_qmail_sends_logsafe_writes_them(self) -> None:
        """A client's NUL, CR or 8-bit byte in an envelope never reaches the log."""
        message = await self.send("c\ra%r\x00l\xe9@remote.test", ["ali\x00ce@example.test"])
        await self.answer(self.rig.local, Outcome.success("did 1+0+0\n"))
        await wait_for(lambda: message.id not in self.rig.queue.messages, "the message to end")
        self.assertIsNotNone(self.logged(rf"info msg {message.id}: bytes [0-9]+ from <c_a_r_l_@remote.test> .*"))
        self.assertIsNotNone(self.logged(rf"starting delivery 1: msg {message.id} to local ali_ce@example.test"))

# -- retries and queuelifetime ------------------------------------------------------------------

class RetryTests(SchedulerTestCase):
    def test_retry_schedule_is_qmails(self) -> None:
        born = 1_700_000_000.0
        for age in (0, 1, 99, 100, 399, 400, 3599, 86_400, 604_800):
            self.assertEqual(next_retry(born, born + age, "remote"), born + (isqrt(age) + 20) ** 2)
            self.assertEqual(next_retry(born, born + age, "local"), born + (isqrt(age) + 10) ** 2)

    async def test_remote_deferral_waits_400_seconds_then_the_schedule_stretches(self) -> None:
        message = await self.send(ALICE, ["x@remote.test"])
        await self.answer(self.rig.remote, LATER)
        self.assertEqual(message.recipients[0].next_try, message.born + 400)
        self.clock.advance(399)
        self.assertEqual(self.rig.remote.waiting, [])
        self.clock.advance(1)
        await self.answer(self.rig.remote, LATER)
        self.assertEqual(message.recipients[0].next_try, message.born + (isqrt(400) + 20) ** 2)
        self.clock.advance(1600 - 400)
        await self.answer(self.rig.remote, DONE)
        await wait_for(lambda: message.id not in self.rig.queue.messages, "the message to end")

    async def test_local_deferral_waits_100_seconds(self) -> None:
        message = await self.send("carol@remote.test", [ALICE])
        await self.answer(self.rig.local, Outcome.deferral("Over quota. (#4.2.2)"))
        self.assertEqual(message.recipients[0].next_try, message.born + 100)
        self.clock.advance(99)
        self.assertEqual(self.rig.local.waiting, [])
        self.clock.advance(1)
        self.assertEqual((await self.rig.local.take()).recipients, [ALICE])

    async def test_the_retry_time_is_on_disk_and_survives_a_restart(self) -> None:
        message = await self.send(ALICE, ["x@remote.test"])
        await self.answer(self.rig.remote, LATER)
        await self.rig.stop()
        self.assertEqual(self.on_disk(message).recipients[0].next_try, message.born + 400)

        self.rig = SchedulerRig(self.home).start()
        self.addCleanup(self.rig.stop)
        self.assertEqual(self.rig.remote.waiting, [])  # not before its time
        self.clock.advance(400)
        self.assertEqual((await self.rig.remote.take()).recipients, ["x@remote.test"])

    async def test_queue_flush_retries_every_deferred_delivery_now(self) -> None:
        await self.send(ALICE, ["x@remote.test"])
        await self.send("carol@remote.test", [ALICE])
        await self.answer(self.rig.remote, LATER)
        await self.answer(self.rig.local, Outcome.deferral("busy"))
        queue_flush(self.home.path)
        self.clock.advance(1)  # the scheduler looks at queue/flush once a second
        self.assertEqual(len(self.rig.remote.waiting), 1)
        self.assertEqual(len(self.rig.local.waiting), 1)
        self.assertIsNotNone(self.logged("flush: retrying every deferred delivery now"))

    async def test_queuelifetime_caps_the_wait_and_the_last_try_bounces(self) -> None:
        self.control("queuelifetime", "1000\n")
        message = await self.send(ALICE, ["x@remote.test"])
        await self.answer(self.rig.remote, LATER)
        self.clock.advance(400)
        await self.answer(self.rig.remote, LATER)
        # qmail's next try would be at 1600 s; the lifetime ends at 1000 s: that try is the last.
        self.assertEqual(message.recipients[0].next_try, message.born + 1000)
        self.clock.advance(600)
        await self.answer(self.rig.remote, LATER)
        self.assertIsNotNone(self.logged(r"delivery 3: failure: .*I'm_not_going_to_try_again;.*"))
        (bounce,) = self.bounces()
        self.assertIn(f"\n{GIVING_UP}\n".encode(), bounce.read_body())
        await wait_for(lambda: message.id not in self.rig.queue.messages, "the message to end")


# -- bounces ------------------------------------------------------------------------------------

class BounceTests(SchedulerTestCase):
    async def test_permanent_failure_bounces_at_once_while_a_sibling_waits_for_its_retry(self) -> None:
        message = await self.send(ALICE, ["bad@remote.test", "later@remote.test", "ok@remote.test"])
        await self.answer(self.rig.remote, GONE, LATER, DONE)
        (bounce,) = self.bounces()
        self.assertEqual((bounce.sender, [r.address for r in bounce.recipients]), ("", [ALICE]))
        text = bounce.read_body()
        self.assertIn(f"From: MAILER-DAEMON@{ME}\n".encode(), text)
        self.assertIn(f"Hi. This is the qmail-send program at {ME}.\n".encode(), text)
        self.assertIn(b"<bad@remote.test>:\n192.0.2.1 does not like recipient.\nRemote host said: 550 no such user\n",
                      text)
        self.assertNotIn(b"<later@remote.test>", text)
        self.assertNotIn(b"<ok@remote.test>", text)
        self.assertTrue(text.endswith(b"--- Below this line is a copy of the message.\n\n"
                                      b"Return-Path: <alice@example.test>\n" + MESSAGE))
        self.assertEqual([r.state for r in message.recipients], [BOUNCED, PENDING, DELIVERED])
        stored = await self._stored_states(message, [BOUNCED, PENDING, DELIVERED])
        self.assertEqual(stored.recipients[1].next_try, message.born + 400)
        self.assertIsNotNone(self.logged(rf"bounce msg {message.id} qp {bounce.id}"))

    async def _stored_states(self, message: QueuedMessage, states: list[str]) -> QueuedMessage:
        await wait_for(lambda: [r.state for r in self.on_disk(message).recipients] == states,
                       f"states {states} on disk")
        return self.on_disk(message)

    async def test_the_bounce_is_delivered_like_any_message(self) -> None:
        await self.send("carol@remote.test", [f"nobody@{DOMAIN}"])
        await self.answer(self.rig.local, Outcome.failure("Sorry, no mailbox here by that name. (#5.1.1)"))
        self.assertEqual((await self.rig.remote.take()).recipients, ["carol@remote.test"])
        self.assertEqual((await self.rig.remote.take()).sender, "")

    async def test_a_failed_bounce_becomes_a_double_bounce_to_postmaster(self) -> None:
        await self.send("", [f"nobody@{DOMAIN}"])
        await self.answer(self.rig.local, Outcome.failure("Sorry, no mailbox here by that name. (#5.1.1)"))
        (double,) = self.bounces()
        self.assertEqual((double.sender, [r.address for r in double.recipients]),
                         (DOUBLE_BOUNCE_SENDER, [f"postmaster@{ME}"]))
        self.assertIn(b"I tried to deliver a bounce message to this address, but the bounce bounced!\n",
                      double.read_body())

    async def test_a_failed_double_bounce_is_discarded_and_logged(self) -> None:
        await self.send(DOUBLE_BOUNCE_SENDER, [f"postmaster@{ME}"])
        await self.answer(self.rig.local, Outcome.failure("Sorry, no mailbox here by that name. (#5.1.1)"))
        self.assertEqual(self.bounces(), [])
        self.assertIsNotNone(self.logged(r"triple bounce: discarding msg \d+"))
        await wait_for(lambda: not self.rig.queue.messages, "the queue to empty")

    async def test_a_message_resolved_but_not_ended_at_a_crash_is_bounced_and_ended_at_start(self) -> None:
        await self.rig.stop()
        queue = Queue(self.home.path, reactor, clock=self.clock)
        queue.open(1000)
        message = await queue.accept(ALICE, ["gone@remote.test", "ok@remote.test"], MESSAGE)
        for index, (state, text) in enumerate([("failed", GONE.text), (DELIVERED, DONE.text)]):
            message.recipients[index].state, message.recipients[index].text = state, text
            queue.record_result(message, index)
        await queue.close()

        self.rig = SchedulerRig(self.home).start()
        self.addCleanup(self.rig.stop)
        await self.rig.settled()
        (bounce,) = self.bounces()
        self.assertIn(b"<gone@remote.test>:\n", bounce.read_body())
        self.assertNotIn(b"<ok@remote.test>", bounce.read_body())
        self.assertNotIn(message.id, self.rig.queue.messages)
        self.assertEqual((await self.rig.local.take()).recipients, [ALICE])  # the bounce itself


# -- forwards and removal -----------------------------------------------------------------------

class ForwardAndRemovalTests(SchedulerTestCase):
    async def test_a_dot_qmail_forward_is_a_new_message_and_the_original_is_delivered(self) -> None:
        message = await self.send("carol@remote.test", [f"fwd@{DOMAIN}"])
        await self.answer(self.rig.local, Outcome.success("did 0+1+0\n", forwards=("x@remote.test",)))
        (attempt,) = self.rig.remote.waiting
        self.assertEqual((attempt.sender, attempt.recipients), ("carol@remote.test", ["x@remote.test"]))
        self.assertEqual(attempt.body(), f"Delivered-To: fwd@{DOMAIN}\n".encode() + MESSAGE)
        await wait_for(lambda: message.id not in self.rig.queue.messages, "the original to end")

    async def test_queue_rm_ends_a_waiting_message_and_it_is_never_tried_again(self) -> None:
        message = await self.send(ALICE, ["x@remote.test"])
        await self.answer(self.rig.remote, LATER)
        removing = deferToThread(queue_remove, self.home.path, [str(message.id)], None, 10)
        requests = self.home.path / "queue" / "rm"
        await wait_for(lambda: [name for name in os.listdir(requests) if not name.startswith(".")],
                       "the removal request")
        self.clock.advance(1)  # the scheduler looks at queue/rm once a second
        self.assertEqual(await removing, 1)
        await self.rig.settled()
        self.assertIsNotNone(self.logged(f"removed msg {message.id} by request"))
        self.assertEqual(queue_stat(self.home.path), (0, 0))
        self.clock.advance(10_000)
        self.assertEqual(self.rig.remote.waiting, [])


# -- concurrency --------------------------------------------------------------------------------

class ConcurrencyTests(SchedulerTestCase):
    controls = {"concurrencylocal": "2\n", "concurrencyremote": "3\n"}

    async def test_concurrencylocal_caps_local_deliveries_and_the_next_starts_when_one_ends(self) -> None:
        for _ in range(5):
            await self.send("carol@remote.test", [ALICE])
        self.assertEqual(len(self.rig.local.waiting), 2)
        self.rig.local.waiting[0].answer(Outcome.success("did 1+0+0\n"))
        await self.rig.settled()
        self.assertEqual(len(self.rig.local.waiting), 2)
        self.assertEqual(len(self.rig.local.attempts), 3)
        self.assertIsNotNone(self.logged(r"status: local 2/2 remote 0/3"))

    async def test_concurrencyremote_caps_remote_deliveries(self) -> None:
        for number in range(5):
            await self.send(ALICE, [f"x@remote{number}.test"])
        self.assertEqual(len(self.rig.remote.waiting), 3)

    async def test_a_new_concurrency_applies_to_the_next_start(self) -> None:
        for number in range(5):
            await self.send(ALICE, [f"x@remote{number}.test"])
        self.control("concurrencyremote", "1\n")
        for attempt in self.rig.remote.waiting:
            attempt.answer(DONE)
        await self.rig.settled()
        self.assertEqual(len(self.rig.remote.waiting), 1)

    async def test_stop_waits_for_deliveries_in_progress(self) -> None:
        message = await self.send(ALICE, ["x@remote.test"])
        stopping = self.rig.scheduler.stopService()
        self.assertFalse(stopping.called)
        (await self.rig.remote.take()).answer(DONE)
        await stopping
        self.assertIsNotNone(self.logged(f"end msg {message.id}"))
        self.assertEqual(queue_stat(self.home.path), (0, 0))

    async def test_stop_gives_up_on_a_delivery_after_the_grace_and_it_is_retried_after_a_start(self) -> None:
        message = await self.send(ALICE, ["x@remote.test"])
        stopping = self.rig.scheduler.stopService()
        self.clock.advance(30)
        await stopping
        self.assertIsNotNone(self.logged(r"stopping: 1 deliveries still running; they are retried after the next start"))
        self.assertEqual([r.state for r in self.on_disk(message).recipients], [PENDING])


def test_log_safe_is_qmail_sends() -> None:
    assert log_safe("a%b c\td\xe9\nnext\n") == "a_b_c_d_/next/"


# -- the real channels, end to end (real time) --------------------------------------------------

class RealChannelsTests(TestCase):
    """The scheduler with the qmail-lspawn child and qmail-remote to the fake SMTP server."""

    def setUp(self) -> None:
        path = Path(tempfile.mkdtemp(prefix="qtwist-send-real-"))
        self.addCleanup(shutil.rmtree, path, True)
        self.sink = FakeSMTP(Script(rcpt={"bad@remote.test": b"550 no such user here"}))
        self.addCleanup(self.sink.close)
        self.home = make_home(path, controls={"smtproutes": f"remote.test:127.0.0.1:{self.sink.port}\n"})
        settings, errors = load(path)
        self.assertEqual(errors, [])
        remote = RemoteDelivery(reactor, lookups=Lookups(reactor, None), remote_port=self.sink.port)
        self.queue = Queue(path, reactor)
        self.scheduler = Scheduler(self.queue, lambda: settings, LocalSpawn(reactor, path), remote, reactor)
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)

    async def send(self, sender: str, recipients: list[str]) -> QueuedMessage:
        message = await self.queue.accept(sender, recipients, MESSAGE)
        self.scheduler.submit(message)
        return message

    async def test_local_and_remote_recipients_arrive_and_the_message_ends(self) -> None:
        message = await self.send("carol@remote.test", [ALICE, "x@remote.test"])
        stored = await self._in_maildir(b"Delivered-To: alice@example.test\n")
        self.assertEqual(stored, b"Return-Path: <carol@remote.test>\nDelivered-To: alice@example.test\n" + MESSAGE)
        await wait_for(lambda: self.sink.delivered(), "the remote delivery")
        (sent,) = self.sink.delivered()
        self.assertEqual((sent.sender, sent.accepted, sent.lf_data), ("carol@remote.test", ["x@remote.test"], MESSAGE))
        await wait_for(lambda: message.id not in self.queue.messages, "the message to end")

    async def test_a_remote_refusal_bounces_into_the_local_senders_maildir(self) -> None:
        await self.send(ALICE, ["bad@remote.test"])
        notice = await self._in_maildir(b"Subject: failure notice")
        self.assertIn(b"<bad@remote.test>:\n127.0.0.1 does not like recipient.\n"
                      b"Remote host said: 550 no such user here\n", notice)

    async def _in_maildir(self, marker: bytes) -> bytes:
        new = self.home.maildir(ALICE) / "new"
        found: list[bytes] = []

        def arrived() -> bool:
            found[:] = [p.read_bytes() for p in new.iterdir() if marker in p.read_bytes()]
            return bool(found)
        await wait_for(arrived, f"a message with {marker!r} in alice's Maildir")
        return found[0]
