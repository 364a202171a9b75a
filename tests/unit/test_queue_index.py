"""A queue bigger than the server holds: the index keeps the messages past
queueactivelimit until they are due, a dead destination's messages wait
untried, and flush, rm, qstat and restarts reach what only the index holds.
On a Clock over the real queue (tests/support/memory.py)."""

from __future__ import annotations

import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from qtwist.delivery import Outcome
from qtwist.queue import DELIVERED, Queue
from qtwist.queue.admin import queue_flush, queue_read, queue_remove, queue_stat
from qtwist.queue.index import GIVE_BACK, Index, open_index
from qtwist.queue.records import LEGACY, QueuedMessage, Recipient, Segment
from qtwist.remote import NO_CONNECTION
from qtwist.send import next_retry
from tests.support.memory import SchedulerRig, wait_for
from tests.support.queuefiles import read_back
from tests.unit.test_send import ALICE, DONE, LATER, SchedulerTestCase

UNREACHABLE = Outcome.deferral(NO_CONNECTION, unreachable=True)


class ActiveLimitTests(SchedulerTestCase):
    controls = {"queueactivelimit": "3\n"}

    async def defer_all(self, count: int) -> list:
        """``count`` messages to as many remote domains, each deferred once."""
        messages = [await self.send(ALICE, [f"x@remote{n}.test"]) for n in range(count)]
        await wait_for(lambda: len(self.rig.remote.waiting) == count, "every first try")
        for attempt in self.rig.remote.waiting:
            attempt.answer(LATER)
        await self.rig.settled()
        return messages

    async def until(self, condition, what: str, step: float = 1.0, limit: int = 2000) -> None:
        """Advance the clock a second at a time (the index is looked at once a
        second, from its writer thread) until ``condition()``."""
        for _ in range(limit):
            if condition():
                return
            self.clock.advance(step)
            await wait_for(lambda: self.rig.scheduler.unfinished <= len(self.rig.remote.waiting), "the scheduler")
        self.fail(f"gave up waiting for {what}")

    async def deliver_retries(self, count: int, what: str) -> set[str]:
        """Answer retries with success until ``count`` recipients were tried; returns them."""
        tried: set[str] = set()
        while len(tried) < count:
            await self.until(lambda: self.rig.remote.waiting, what)
            for attempt in self.rig.remote.waiting:
                tried.add(attempt.recipients[0])
                attempt.answer(DONE)
            await self.rig.settled()
        return tried

    async def test_past_the_limit_deferred_messages_wait_in_the_index_and_come_back_when_due(self) -> None:
        messages = await self.defer_all(6)
        self.assertLessEqual(len(self.rig.queue.messages), 3)
        self.assertEqual(queue_stat(self.home.path), (6, 0))
        retry = next_retry(messages[-1].born, self.clock.seconds(), "remote") - self.clock.seconds()
        self.clock.advance(retry - 5)
        await wait_for(lambda: True, "a turn")
        self.assertEqual(self.rig.remote.waiting, [])  # none early
        tried = await self.deliver_retries(6, "a retry")
        self.assertEqual(tried, {f"x@remote{n}.test" for n in range(6)})
        self.assertLessEqual(len(self.rig.queue.messages), 3)
        await self.until(lambda: queue_stat(self.home.path) == (0, 0), "an empty queue")

    async def test_messages_only_the_index_holds_keep_qmails_schedule_and_their_lifetime(self) -> None:
        self.control("queuelifetime", "1000\n")
        messages = await self.defer_all(6)
        self.assertTrue(all(m.recipients[0].next_try == m.born + 400 for m in messages))
        tries: dict[str, list[float]] = {}
        for _ in range(1200):  # a second at a time: the index is looked at once a second
            if len(tries) == 6 and all(len(times) == 2 for times in tries.values()):
                break
            self.clock.advance(1)
            await self.rig.settled()
            for attempt in self.rig.remote.waiting:
                tries.setdefault(attempt.recipients[0], []).append(self.clock.seconds())
                attempt.answer(LATER)
            for attempt in self.rig.local.waiting:  # the bounces
                attempt.answer(DONE)
            await self.rig.settled()
        for message in messages:
            born, times = message.born, tries[message.recipients[0].address]
            # Each try when due, give or take the index's once-a-second look (and the
            # turn its answer takes): 400 s, then the lifetime's end at 1000 s (qmail's
            # next try would be at 1600 s), and no more.
            self.assertEqual(len(times), 2, times)
            self.assertTrue(born + 400 <= times[0] <= born + 403, (born, times))
            self.assertTrue(born + 1000 <= times[1] <= born + 1003, (born, times))
        given_up = [line for line in self.log() if "failure:" in line and "not_going_to_try_again" in line]
        self.assertEqual(len(given_up), 6)
        for attempt in self.rig.local.waiting:
            attempt.answer(DONE)
        self.clock.advance(3600)
        await self.rig.settled()
        self.assertEqual(self.rig.remote.waiting, [])

    async def test_flush_retries_what_only_the_index_holds(self) -> None:
        await self.defer_all(5)
        flushed_at = self.clock.seconds()
        queue_flush(self.home.path)
        await self.deliver_retries(5, "a flushed retry")
        self.assertLess(self.clock.seconds() - flushed_at, 60)  # long before any retry was due

    async def test_queue_rm_removes_a_message_only_the_index_holds(self) -> None:
        messages = await self.defer_all(5)
        unheld = next(m for m in messages if m.id not in self.rig.queue.messages)
        removing = deferToThread(queue_remove, self.home.path, [str(unheld.id)], None, 10)
        requests = self.home.path / "queue" / "rm"
        await wait_for(lambda: [name for name in os.listdir(requests) if not name.startswith(".")],
                       "the removal request")
        self.clock.advance(1)  # the scheduler looks at queue/rm once a second
        self.assertEqual(await removing, 1)
        await self.until(lambda: self.logged(f"removed msg {unheld.id} by request"), "the log line")
        self.assertEqual(queue_stat(self.home.path), (4, 0))
        self.assertNotIn(unheld.id, [m.id for m in queue_read(self.home.path)])


class DeadDestinationTests(SchedulerTestCase):
    controls = {"queueactivelimit": "2\n"}

    async def test_a_dead_destination_costs_one_try_and_the_rest_wait_for_its_retry(self) -> None:
        first = await self.send(ALICE, ["a@dead.test"])
        await self.answer(self.rig.remote, UNREACHABLE)
        until = next_retry(self.clock.seconds(), self.clock.seconds(), "remote")
        self.assertIsNotNone(self.logged(rf"destination dead\.test unreachable: its messages wait until {int(until)}"))
        for n in range(5):
            await self.send(ALICE, [f"b{n}@dead.test"])
        await self.rig.settled()
        self.assertEqual(len(self.rig.remote.attempts), 1)  # the others were put off, untried
        self.assertEqual(len([line for line in self.log() if line.startswith("delivery put off: msg ")]), 5)
        self.assertLessEqual(len(self.rig.queue.messages), 2)
        self.clock.advance(until - self.clock.seconds() - 1)
        await self.rig.settled()
        self.assertEqual(len(self.rig.remote.attempts), 1)
        # At the destination's retry time its messages are tried again; one answer revives it.
        delivered = set()
        for _ in range(100):
            self.clock.advance(1)
            await self.rig.settled()
            for attempt in self.rig.remote.waiting:
                delivered.add(attempt.recipients[0])
                attempt.answer(DONE)
            if len(delivered) == 6:
                break
        self.assertEqual(delivered, {"a@dead.test"} | {f"b{n}@dead.test" for n in range(5)})
        self.assertNotIn(first.id, self.rig.queue.messages)


    async def test_the_messages_only_the_index_holds_are_put_off_in_bulk(self) -> None:
        """The index's messages for a destination found dead wait, untried,
        until its retry time; the message whose try found it settles as usual."""
        messages = [await self.send(ALICE, [f"b{n}@dead.test"]) for n in range(5)]
        await wait_for(lambda: len(self.rig.remote.waiting) == 5, "every first try")
        for attempt in self.rig.remote.waiting:
            attempt.answer(LATER)
        await self.rig.settled()
        in_index = [m.id for m in messages if m.id not in self.rig.queue.messages]
        self.assertGreaterEqual(len(in_index), 3)
        self.clock.advance(max(next_retry(m.born, self.clock.seconds(), "remote") for m in messages)
                           - self.clock.seconds())
        for _ in range(20):  # the index is looked at once a second
            await self.rig.settled()
            if self.rig.remote.waiting:
                break
            self.clock.advance(1)
        self.rig.remote.waiting[0].answer(UNREACHABLE)
        for attempt in self.rig.remote.waiting:
            attempt.answer(UNREACHABLE)
        await self.rig.settled()
        until = self.rig.scheduler._dead["dead.test"].until
        self.assertEqual(self.rig.scheduler.unfinished, 0)
        index = Index(self.home.path / "queue" / "index.sqlite", readonly=True)
        self.addCleanup(index.close)
        due = dict(index.db.execute("SELECT id, due FROM schedule WHERE held = 0"))
        self.assertTrue(due)
        self.assertTrue(all(due[i] >= until for i in due), (due, until))


class RestartTests(SchedulerTestCase):
    async def test_start_reads_only_what_the_index_has_not_applied(self) -> None:
        """Damage inside what the index already holds goes unnoticed at start
        (it is not read again); a torn write beyond it is cut off."""
        kept = await self.rig.queue.accept(ALICE, ["x@remote.test"], b"Subject: kept\n\nbody\n")
        await self.rig.stop()
        segment = next((self.home.path / "queue" / "seg").iterdir())
        data = bytearray(segment.read_bytes())
        data[data.find(b"Subject: kept") + 1] ^= 0x20  # inside the body: only a full read would see it
        segment.write_bytes(bytes(data) + b"QTW2 torn")
        queue = Queue(self.home.path, reactor, clock=self.clock)
        self.assertEqual([m.id for m in queue.open(10)], [kept.id])
        await queue.close()
        self.assertFalse((self.home.path / "queue" / "corrupt").exists())
        self.assertEqual(segment.read_bytes(), bytes(data))
        index = open_index(self.home.path / "queue")
        self.assertEqual(index.segments_applied(), {int(segment.name): len(data)})
        index.close()

    async def test_qstat_and_qread_see_new_messages_the_index_has_not_heard_of(self) -> None:
        message = await self.send(ALICE, ["x@remote.test"])
        index = Index(self.home.path / "queue" / "index.sqlite", readonly=True)
        self.addCleanup(index.close)
        self.assertEqual(index.count(), 0)  # delivered within moments, most never enter it
        self.assertEqual(queue_stat(self.home.path), (1, 0))
        self.assertEqual([m.id for m in queue_read(self.home.path)], [message.id])
        self.assertEqual(list(read_back(self.home.path / "queue").messages), [message.id])


class CompactionTests(SchedulerTestCase):
    async def test_a_segment_mostly_ended_is_rewritten_and_removed_with_every_live_message_intact(self) -> None:
        queue = self.rig.queue
        messages = [await queue.accept(ALICE, [f"x{n}@remote.test", f"y{n}@other.test"],
                                       f"Subject: {n}\n\n".encode() + b"z" * 4000) for n in range(10)]
        kept = messages[3], messages[7]
        kept[0].recipients[0].state, kept[0].recipients[0].text = DELIVERED, "did 1+0+0"
        queue.record_result(kept[0], 0)
        kept[1].recipients[1].next_try, kept[1].recipients[1].text = 1234.0, "try later"
        queue.record_deferral(kept[1], 1)
        for message in messages:
            if message not in kept:
                await queue.end(message, "done")
        await self.rig.stop()
        [old] = (self.home.path / "queue" / "seg").iterdir()

        queue = Queue(self.home.path, reactor, clock=self.clock)
        self.assertEqual(queue.open(0), [])  # it holds nothing: every message may move
        self.assertEqual(await queue.compact(), (2, []))
        self.assertFalse(old.exists())
        self.assertEqual(await queue.compact(), (0, []))
        await queue.close()
        found = read_back(self.home.path / "queue")
        self.assertEqual(found.problems, [])
        self.assertEqual(sorted(found.messages), sorted(m.id for m in kept))
        for message in kept:
            copy = found.messages[message.id]
            self.assertEqual(copy.read_body(), f"Subject: {messages.index(message)}\n\n".encode() + b"z" * 4000)
            self.assertEqual([(r.address, r.state, r.text, r.next_try) for r in copy.recipients],
                             [(r.address, r.state, r.text, r.next_try) for r in message.recipients])
        queue = Queue(self.home.path, reactor, clock=self.clock)
        reopened = {m.id: m for m in queue.open(10)}
        self.assertEqual(reopened[kept[0].id].read_body()[:9], b"Subject: ")
        await queue.close()

    async def test_messages_the_server_holds_are_let_go_so_their_segment_can_go(self) -> None:
        messages = [await self.send(ALICE, [f"x{n}@remote{n}.test"], b"z" * 4000) for n in range(8)]
        await wait_for(lambda: len(self.rig.remote.waiting) == 8, "every first try")
        for attempt in self.rig.remote.waiting:
            attempt.answer(LATER if attempt.recipients[0] in ("x2@remote2.test", "x5@remote5.test") else DONE)
        await self.rig.settled()
        await self.rig.stop()
        [old] = (self.home.path / "queue" / "seg").iterdir()
        # The next start holds the two deferred messages, and compacts at once.
        self.rig = SchedulerRig(self.home).start()
        self.addCleanup(self.rig.stop)
        await self.rig.settled()
        self.assertFalse(old.exists())
        self.assertIsNotNone(self.logged("compacted the queue: moved 2 messages out of segments mostly ended"))
        self.assertEqual(sorted(m.id for m in queue_read(self.home.path)), [messages[2].id, messages[5].id])
        retry = next_retry(messages[2].born, self.clock.seconds(), "remote") - self.clock.seconds()
        self.clock.advance(retry)
        for _ in range(100):  # taken back from the index (looked at once a second), then tried
            if len(self.rig.remote.attempts) == 2:
                break
            self.clock.advance(1)
            await self.rig.settled()
        self.assertEqual(sorted(a.recipients[0] for a in self.rig.remote.attempts),
                         ["x2@remote2.test", "x5@remote5.test"])

    async def test_the_index_gives_back_the_room_of_ended_messages(self) -> None:
        path = self.home.path / "spare-index.sqlite"
        index = Index(path)
        self.addCleanup(index.close)
        segment = Segment(1, self.home.path / "seg-1", LEGACY)
        with index.transaction():
            for n in range(1, 5001):
                index.add(QueuedMessage(n, 0.0, "a@b.test", [Recipient(f"x{n}@remote.test")], 1000, segment, 0),
                          held=False)
        index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        full = path.stat().st_size
        with index.transaction():
            index.drop_segment(1)
        while index.give_back(GIVE_BACK):
            pass
        index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertLess(path.stat().st_size, full / 4)
        self.assertEqual(index.count(), 0)

    async def test_messages_of_a_segment_being_compacted_stay_in_the_index(self) -> None:
        index = Index(":memory:")
        self.addCleanup(index.close)
        segments = {n: Segment(n, self.home.path / f"seg-{n}", LEGACY) for n in (1, 2)}
        with index.transaction():
            for n in range(1, 7):
                index.add(QueuedMessage(n, 0.0, "a@b.test", [Recipient("x@remote.test", next_try=n)], 10,
                                        segments[1 + n % 2], 0), held=False)
        self.assertEqual([m.id for m in index.take_due(10, segments, skip={1})], [1, 3, 5])
        self.assertEqual([m.id for m in index.take_due(10, segments)], [2, 4, 6])

    async def test_an_index_made_without_giving_back_keeps_its_free_pages_and_says_so(self) -> None:
        path = self.home.path / "old-index.sqlite"
        old = sqlite3.connect(path)
        old.execute("CREATE TABLE spare (x)")
        old.executemany("INSERT INTO spare VALUES (?)", [(b"x" * 1000,) for _ in range(100)])
        old.commit()
        old.close()
        index = Index(path)
        self.addCleanup(index.close)
        index.db.execute("DELETE FROM spare")
        self.assertEqual(index.db.execute("PRAGMA auto_vacuum").fetchone()[0], 0)
        self.assertFalse(index.give_back(GIVE_BACK))

    async def test_a_segment_whose_messages_are_mostly_alive_stays(self) -> None:
        queue = self.rig.queue
        messages = [await queue.accept(ALICE, ["x@remote.test"], b"z" * 4000) for _ in range(4)]
        await queue.end(messages[0], "done")
        await self.rig.stop()
        [old] = (self.home.path / "queue" / "seg").iterdir()
        queue = Queue(self.home.path, reactor, clock=self.clock)
        queue.open(0)
        self.assertEqual(await queue.compact(), (0, []))
        await queue.close()
        self.assertTrue(old.exists())

    async def test_the_index_is_private_like_the_segments(self) -> None:
        await self.send(ALICE, ["x@remote.test"])
        queue_dir = self.home.path / "queue"
        for name in ("index.sqlite", "index.sqlite-wal", "key"):
            self.assertEqual((queue_dir / name).stat().st_mode & 0o777, 0o600, name)

    async def test_a_removal_meets_a_message_the_server_took_meanwhile_and_leaves_it_to_the_server(self) -> None:
        message = await self.rig.queue.accept(ALICE, ["x@remote.test"], b"m\n")
        await self.rig.stop()
        queue = Queue(self.home.path, reactor, clock=self.clock)
        [held] = queue.open(10)
        self.assertEqual(held.id, message.id)
        self.assertEqual(await queue.remove([held.id]), ([], [held.id]))
        await queue.close()
