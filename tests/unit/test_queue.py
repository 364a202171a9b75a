"""The durable queue: what was acknowledged survives, what was not never appears."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from qtwist.queue import DELIVERED, FAILED, Queue, QueueError, Recipient
from qtwist.queue.admin import queue_read, queue_remove, queue_stat
from qtwist.queue import records, writer
from tests.support.queuefiles import forget_index, read_back
from qtwist.queue.todo import TODO_SCRATCH_LIFETIME, drop_todo, remove_todo, take_todo


class QueueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="qtwist-queue-test-"))
        self.addCleanup(shutil.rmtree, self.home, True)
        self.queue = Queue(self.home, reactor)
        self.assertEqual(self.queue.open(1000), [])

    def tearDown(self):
        return self.queue.close()

    async def test_accepted_message_is_on_disk_when_the_deferred_fires(self) -> None:
        message = await self.queue.accept("a@x.test", ["b@example.test"], b"Subject: hi\n\nbody\n")
        found = read_back(self.home / "queue").messages
        self.assertIn(message.id, found)
        self.assertEqual(found[message.id].read_body(), b"Subject: hi\n\nbody\n")
        self.assertEqual(found[message.id].sender, "a@x.test")
        self.assertEqual(queue_stat(self.home), (1, 0))

    async def test_concurrent_accepts_share_the_log_and_keep_their_bodies(self) -> None:
        from twisted.internet.defer import gatherResults
        bodies = [f"message {i}\n".encode() * (i + 1) for i in range(50)]
        messages = await gatherResults([self.queue.accept("s@x.test", ["r@y.test"], body)
                                        for body in bodies])
        self.assertEqual(len({m.id for m in messages}), 50)
        stored = read_back(self.home / "queue").messages
        for message, body in zip(messages, bodies):
            self.assertEqual(stored[message.id].read_body(), body)

    async def test_results_and_end_are_recovered_after_restart(self) -> None:
        message = await self.queue.accept("s@x.test", ["a@y.test", "b@y.test"], b"x\n")
        message.recipients[0].state = DELIVERED
        self.queue.record_result(message, 0)
        message.recipients[1].state, message.recipients[1].text = FAILED, "no such user"
        self.queue.record_result(message, 1)
        other = await self.queue.accept("s@x.test", ["c@y.test"], b"y\n")
        await self.queue.end(other, "done")
        await self.queue.close()

        self.queue = Queue(self.home, reactor)
        recovered = self.queue.open(1000)
        self.assertEqual([m.id for m in recovered], [message.id])
        states = [(r.state, r.text) for r in recovered[0].recipients]
        self.assertEqual(states, [(DELIVERED, ""), (FAILED, "no such user")])

    async def test_torn_tail_is_cut_and_earlier_messages_stay(self) -> None:
        message = await self.queue.accept("s@x.test", ["a@y.test"], b"kept\n")
        await self.queue.close()
        segment = next((self.home / "queue" / "seg").iterdir())
        record, _ = self.queue.records.message(message.id + 1, 0.0, "s@x.test", [], b"half a message")
        with open(segment, "ab") as handle:
            handle.write(record[:-5])  # a write that never finished: no 250 was given
        self.queue = Queue(self.home, reactor)
        recovered = self.queue.open(1000)
        self.assertEqual([m.id for m in recovered], [message.id])
        self.assertEqual(recovered[0].read_body(), b"kept\n")

    async def test_damaged_record_is_skipped_and_a_copy_kept(self) -> None:
        first = await self.queue.accept("s@x.test", ["a@y.test"], b"first message body\n")
        second = await self.queue.accept("s@x.test", ["a@y.test"], b"second message body\n")
        await self.queue.close()
        segment = next((self.home / "queue" / "seg").iterdir())
        data = bytearray(segment.read_bytes())
        data[data.find(b"first message body")] ^= 0xFF
        segment.write_bytes(bytes(data))
        forget_index(self.home / "queue")  # the segment is read again from its start
        self.queue = Queue(self.home, reactor)
        recovered = self.queue.open(1000)
        self.assertEqual([m.id for m in recovered], [second.id])
        self.assertNotIn(first.id, [m.id for m in recovered])
        self.assertTrue(list((self.home / "queue" / "corrupt").iterdir()))

    async def test_records_quoted_in_a_body_are_never_taken_for_real_ones(self) -> None:
        """A body may carry whole records (a forged end for another message, a
        made-up message): neither a torn tail nor a damaged header lets recovery
        read them, since their MACs need the queue's key."""
        kept = await self.queue.accept("s@x.test", ["a@y.test"], b"kept\n")
        forger = records.Records(os.urandom(records.KEY_SIZE))
        quoted = (forger.end(kept.id, "removed") + forger.message(999, 0.0, "x@x.test", [], b"made up\n")[0]
                  + records.LEGACY.end(kept.id, "removed") + records.LEGACY.message(998, 0.0, "", [], b"m\n")[0])
        carrier = await self.queue.accept("s@x.test", ["b@y.test"], b"Subject: q\n\n" + quoted)
        after = await self.queue.accept("s@x.test", ["c@y.test"], b"after\n")
        await self.queue.close()
        segment = next((self.home / "queue" / "seg").iterdir())
        clean = segment.read_bytes()

        torn, _ = self.queue.records.message(after.id + 1, 0.0, "s@x.test", [], b"Subject: q\n\n" + quoted)
        segment.write_bytes(clean + torn[:-3])
        forget_index(self.home / "queue")
        self.queue = Queue(self.home, reactor)
        self.assertEqual(sorted(m.id for m in self.queue.open(1000)), [kept.id, carrier.id, after.id])
        await self.queue.close()
        self.assertEqual(segment.read_bytes(), clean)

        header = clean.find(self.queue.records.magic, clean.find(b"kept\n"))
        damaged = bytearray(clean)
        damaged[header + 6] ^= 0x01  # the carrier's id
        segment.write_bytes(bytes(damaged))
        found = read_back(self.home / "queue")
        self.assertEqual(sorted(found.messages), [kept.id, after.id])
        self.assertEqual(found.messages[after.id].read_body(), b"after\n")

    async def test_segments_of_an_older_server_are_read_and_ended_in_their_format(self) -> None:
        await self.queue.close()
        (self.home / "queue" / "key").unlink()  # older servers wrote QTW1 records, with no key
        legacy = records.LEGACY
        (self.home / "queue" / "seg" / "000000000001").write_bytes(
            legacy.message(1, 0.0, "s@x.test", [Recipient("a@y.test")], b"one\n")[0]
            + legacy.message(2, 0.0, "s@x.test", [Recipient("b@y.test")], b"two\n")[0])
        self.assertEqual(queue_remove(self.home, ["1"], None), 1)
        self.queue = Queue(self.home, reactor)
        [message] = self.queue.open(1000)
        self.assertEqual((message.id, message.read_body()), (2, b"two\n"))
        message.recipients[0].state = DELIVERED
        self.queue.record_result(message, 0)
        await self.queue.close()
        found = read_back(self.home / "queue")
        self.assertEqual(found.problems, [])
        self.assertEqual([r.state for r in found.messages[2].recipients], [DELIVERED])
        self.queue = Queue(self.home, reactor)
        self.queue.open(1000)

    async def test_a_replaced_key_moves_segments_aside_whole(self) -> None:
        await self.queue.accept("s@x.test", ["a@y.test"], b"m\n")
        await self.queue.close()
        segment = next((self.home / "queue" / "seg").iterdir())
        kept = segment.read_bytes()
        (self.home / "queue" / "key").unlink()
        self.queue = Queue(self.home, reactor)
        self.assertEqual(self.queue.open(1000), [])
        [aside] = (self.home / "queue" / "corrupt").iterdir()
        self.assertEqual(aside.read_bytes(), kept)

    async def test_foreign_file_in_segments_is_moved_aside(self) -> None:
        await self.queue.close()
        (self.home / "queue" / "seg" / "000000000001").write_bytes(b"\x00garbage that is not a queue")
        self.queue = Queue(self.home, reactor)
        self.assertEqual(self.queue.open(1000), [])
        self.assertEqual(os.listdir(self.home / "queue" / "seg"), [])
        self.assertEqual(len(os.listdir(self.home / "queue" / "corrupt")), 1)

    async def test_second_server_cannot_open_the_same_queue(self) -> None:
        other = Queue(self.home, reactor)
        self.assertRaises(QueueError, other.open, 1000)

    async def test_segment_file_is_removed_when_all_its_messages_ended(self) -> None:
        self.patch(writer, "SEGMENT_LIMIT", 1)  # every message gets a segment of its own
        messages = [await self.queue.accept("s@x.test", ["a@y.test"], b"m\n") for _ in range(3)]
        for message in messages[:2]:
            await self.queue.end(message, "done")
        await self.queue.accept("s@x.test", ["a@y.test"], b"m\n")  # lets the writer catch up
        names = sorted(os.listdir(self.home / "queue" / "seg"))
        self.assertEqual(len(names), 2)
        self.assertNotIn(f"{messages[0].id:012d}", names)

    async def test_remove_without_a_server_appends_end_records(self) -> None:
        message = await self.queue.accept("s@x.test", ["a@y.test"], b"m\n")
        await self.queue.close()
        self.assertEqual([m.id for m in queue_read(self.home)], [message.id])
        self.assertEqual(queue_remove(self.home, [str(message.id)], None), 1)
        self.assertEqual(queue_stat(self.home), (0, 0))
        self.assertRaises(QueueError, queue_remove, self.home, ["12345"], None)
        self.queue = Queue(self.home, reactor)
        self.assertEqual(self.queue.open(1000), [])


class TodoTests(unittest.TestCase):
    """queue/todo/, where ``qtwist sendmail`` leaves messages for the server."""

    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="qtwist-todo-test-"))
        self.addCleanup(shutil.rmtree, self.home, True)

    def test_dropped_message_is_taken_byte_for_byte_with_its_owner(self) -> None:
        body = b"Subject: 8-bit\n\ncaf\xe9\r stays\n.\nno newline at the end"
        path = drop_todo(self.home, "", ["a@example.test", "b@remote.test"], body)
        self.assertEqual(queue_stat(self.home), (0, 1))
        batch = take_todo(self.home / "queue")
        (taken,) = batch.messages
        self.assertEqual((taken.path, taken.uid, taken.sender, taken.recipients, taken.body),
                         (path, os.getuid(), "", ["a@example.test", "b@remote.test"], body))
        self.assertEqual((batch.problems, batch.more), ([], False))
        remove_todo(self.home / "queue", [taken.path])
        self.assertEqual(queue_stat(self.home), (0, 0))

    def test_only_an_old_unfinished_file_is_cleaned_away(self) -> None:
        todo = self.home / "queue" / "todo"
        todo.mkdir(parents=True)
        (todo / ".old").write_bytes(b"QTWTODO1\n")
        (todo / ".fresh").write_bytes(b"QTWTODO1\n")
        long_ago = os.stat(todo / ".old").st_mtime - TODO_SCRATCH_LIFETIME - 60
        os.utime(todo / ".old", (long_ago, long_ago))
        batch = take_todo(self.home / "queue")
        self.assertEqual(batch.messages, [])
        self.assertEqual(len(batch.problems), 1)
        self.assertIn("queue/todo/.old", batch.problems[0])
        self.assertEqual(sorted(os.listdir(todo)), [".fresh"])
        self.assertEqual(queue_stat(self.home), (0, 0))

    def test_envelope_without_recipients_is_moved_aside(self) -> None:
        todo = self.home / "queue" / "todo"
        todo.mkdir(parents=True)
        (todo / "1").write_bytes(b'QTWTODO1\n{"sender":"a@x.test","rcpt":[]}\nSubject: x\n\n')
        batch = take_todo(self.home / "queue")
        self.assertEqual(batch.messages, [])
        self.assertIn("needs a sender and at least one recipient", batch.problems[0])
        self.assertEqual(os.listdir(todo), [])
        self.assertEqual(len(os.listdir(self.home / "queue" / "corrupt")), 1)
