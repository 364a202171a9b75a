"""``Queue``: the running server's handle on its queue: accept durably,
record results and retry times, end messages."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from qtwist.queue.index import CHUNK, GIVE_BACK, State, open_index, recover
from qtwist.queue.records import QueuedMessage, QueueError, Recipient, Records, Segment, queue_key
from qtwist.queue.todo import make_todo_dir
from qtwist.queue.writer import Work, Write, Writer

log = Logger(namespace="qtwist.queue")


class Queue:
    """The running server's queue: accept durably, record results, end messages.

    Only one process may own a queue; ``open`` takes HOME/queue/lock.
    ``reactor`` runs the writer's hand-overs; ``clock`` (the reactor unless a
    test gives another) stamps each message's birth, which the scheduler's
    retry schedule and queuelifetime count from.  ``messages`` holds the
    messages the server works on (new ones, and those the scheduler took
    from the index); the others are only in the segments and the index.
    """

    def __init__(self, home: Path, reactor, clock: IReactorTime | None = None):
        self.dir = home / "queue"
        self.reactor = reactor
        self.clock = clock or reactor
        self.messages: dict[int, QueuedMessage] = {}
        self.segments: dict[int, Segment] = {}
        self._next_id = 1
        self._lock_fd: int | None = None
        self._writer: Writer | None = None
        self._outbox: list[Write | Work] = []
        self.records: Records | None = None

    def open(self, limit: int) -> list[QueuedMessage]:
        """Lock, bring the index up to date with what was acknowledged, start
        the writer; returns the (at most ``limit``) messages due soonest."""
        for sub in ("seg", "rm"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        make_todo_dir(self.dir / "todo")
        self._lock_fd = take_lock(self.dir)
        if self._lock_fd is None:
            raise QueueError(f"{self.dir} is in use by another qtwist server")
        self.records = Records(queue_key(self.dir, create=True).key)
        index = open_index(self.dir)
        recovery = recover(self.dir, index)
        for problem in recovery.problems:
            log.warn("queue: {problem}", problem=problem)
        self.segments = recovery.segments
        first = index.take_due(limit, self.segments)
        self.messages = {message.id: message for message in first}
        self._next_id = max(recovery.max_id + 1, int(self.clock.seconds() * 1000))
        self._writer = Writer(self.dir / "seg", self.records, self._allocate, self.reactor, self._committed,
                              index, self.segments)
        self._writer.start()
        return first

    def close(self) -> Deferred:
        """Let the writer finish what it has, then release the lock."""
        self._hand_over()
        writer, self._writer = self._writer, None
        if writer is None:
            return succeed(None)
        writer.submit(None)
        done = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.join)

        def release(result):
            for segment in self.segments.values():
                segment.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            return result
        return done.addBoth(release)

    def free(self) -> bool:
        """Whether no other server holds this queue (checked before starting)."""
        if not self.dir.is_dir():
            return True
        lock = take_lock(self.dir)
        if lock is None:
            return False
        os.close(lock)
        return True

    def _allocate(self) -> int:
        number = self._next_id
        self._next_id += 1
        return number

    def accept(self, sender: str, recipients: list[str], body: bytes) -> Deferred:
        """Queue a message; the Deferred fires with the QueuedMessage once it is
        fsynced (the moment the SMTP server may say 250), or fails with QueueError."""
        message = QueuedMessage(self._allocate(), self.clock.seconds(), sender,
                                [Recipient(address) for address in recipients], len(body), body=body)
        data, body_offset = self.records.message(message.id, message.born, sender, message.recipients, body)
        deferred = Deferred()
        self._submit(Write(data, None, deferred, message=message, body_offset=body_offset))
        return deferred

    def record_result(self, message: QueuedMessage, index: int) -> None:
        """Note a recipient's final state (delivered or failed) in the log."""
        self._submit(Write(message.segment.records.result(message.id, index, message.recipients[index]),
                           message.segment, durable=False, changed=message))

    def record_deferral(self, message: QueuedMessage, index: int) -> None:
        recipient = message.recipients[index]
        self._submit(Write(message.segment.records.deferral(message.id, index, recipient.next_try, recipient.text),
                           message.segment, durable=False, changed=message))

    def end(self, message: QueuedMessage, why: str) -> Deferred:
        """The message is done with (delivered, bounced or removed); an admin's
        removal is made durable at once."""
        deferred = Deferred()
        self._submit(Write(message.segment.records.end(message.id, why), message.segment, deferred, ending=message,
                           durable=why == "removed"))
        return deferred

    # -- what only the index holds -------------------------------------------------

    def release(self, message: QueuedMessage) -> None:
        """The server stops holding ``message``: the index keeps when it is due."""
        if self.messages.pop(message.id, None) is not None:
            state = State.of(message.recipients)
            self._submit(Work(lambda writer: writer.let_go(message, state)))

    def take_due(self, limit: int) -> Deferred:
        """Fires with the (at most ``limit``) messages due soonest the server
        does not hold, now held, and when the next one after them is due."""
        def take(writer: Writer) -> tuple[list[QueuedMessage], float | None]:
            return writer.index.take_due(limit, writer.segments, writer.compacting), writer.index.next_due()
        deferred = self._ask(take)
        return deferred.addCallback(self._took)

    def _took(self, result: tuple[list[QueuedMessage], float | None]) -> tuple[list[QueuedMessage], float | None]:
        taken, next_due = result
        for message in taken:
            self.messages[message.id] = message
        return taken, next_due

    def put_off(self, domain: str, until: float, lifetime: float) -> Deferred:
        """Every message for ``domain`` the server does not hold is due no
        earlier than ``until`` (nor later than its end of life); fires with
        how many were put off."""
        return self._in_chunks(lambda index: index.put_off(domain, until, lifetime))

    def flush(self) -> Deferred:
        """Every message the server does not hold is due now, in its order."""
        return self._in_chunks(lambda index: index.flush())

    def remove(self, ids: list[int]) -> Deferred:
        """End those of ``ids`` the server does not hold, durably, CHUNK at a
        time between other work; fires with the ids ended and those the
        server took meanwhile (the caller ends them as held messages)."""
        done = Deferred()
        removed: list[int] = []
        held: list[int] = []

        def remove(writer: Writer, start: int) -> None:
            found = writer.index.locate(ids[start:start + CHUNK])
            held.extend(message_id for message_id, _, is_held in found if is_held)
            writes = [Write(writer.segments[number].records.end(message_id, "removed"), writer.segments[number],
                            ending=QueuedMessage(message_id, 0.0, "", [], 0, writer.segments[number]))
                      for message_id, number, is_held in found if not is_held and number in writer.segments]
            writer.write_now(writes)
            removed.extend(write.ending.id for write in writes if write.error is None)
            if start + CHUNK < len(ids):
                writer.submit([Work(lambda writer: remove(writer, start + CHUNK))])
            else:
                self.reactor.callFromThread(done.callback, (removed, held))
        self._submit(Work(lambda writer: remove(writer, 0)))
        return done

    def compact(self, only: set[int] | None = None) -> Deferred:
        """Compact the segments mostly made of ended messages (Writer.compact),
        a step at a time between other work; fires with how many messages
        moved and the ids of held messages that keep a segment from going.
        With ``only``, just those segments, and until each is done the index
        gives none of its messages to the server (the caller let go of them
        so that they could move)."""
        done = Deferred()
        total, pinned = 0, []

        def start(writer: Writer) -> None:
            numbers = sorted(writer.segments if only is None else only & writer.segments.keys())
            if only is not None:
                writer.compacting.update(numbers)
            step(writer, numbers)

        def step(writer: Writer, numbers: list[int]) -> None:
            nonlocal total
            try:
                while numbers:
                    moved, held = writer.compact(numbers[0])
                    if moved:
                        total += moved
                        writer.submit([Work(lambda writer: step(writer, numbers))])
                        return
                    pinned.extend(held)
                    writer.compacting.discard(numbers.pop(0))
                # The index's pages of ended messages go back too, a piece at a time.
                if writer.index.give_back(GIVE_BACK):
                    writer.submit([Work(lambda writer: step(writer, numbers))])
                    return
            except Exception as error:  # logged by whoever waits; the next compaction starts afresh
                writer.compacting.difference_update(numbers)
                self.reactor.callFromThread(done.errback, error)
                return
            self.reactor.callFromThread(done.callback, (total, pinned))
        self._submit(Work(start))
        return done

    def _in_chunks(self, step) -> Deferred:
        """Bulk index work a chunk at a time, the records of other work in
        between; fires with the rows it changed."""
        done = Deferred()
        total = 0

        def chunk(writer: Writer) -> None:
            nonlocal total
            changed = step(writer.index)
            total += changed
            if changed:
                writer.submit([Work(chunk)])
            else:
                self.reactor.callFromThread(done.callback, total)
        self._submit(Work(chunk))
        return done

    def _ask(self, job) -> Deferred:
        deferred = Deferred()
        self._submit(Work(job, deferred))
        return deferred

    def _submit(self, item: Write | Work) -> None:
        """Records of one reactor turn go to the writer together: one wake-up
        of its thread (and one GIL hand-over) instead of one per record."""
        if self._writer is None:
            raise QueueError("the queue is closed")
        self._outbox.append(item)
        if len(self._outbox) == 1:
            self.reactor.callLater(0, self._hand_over)

    def _hand_over(self) -> None:
        if self._outbox and self._writer is not None:
            outbox, self._outbox = self._outbox, []
            self._writer.submit(outbox)

    def _committed(self, writes: list[Write]) -> None:
        """On the reactor thread: a batch is durable (or failed)."""
        for write in writes:
            if write.error is not None:
                if write.deferred is not None:
                    write.deferred.errback(QueueError(f"queue write failed: {write.error.strerror}"))
                continue
            result = None
            if write.message is not None:
                self.messages[write.message.id] = result = write.message
            elif write.ending is not None:
                self.messages.pop(write.ending.id, None)
                write.ending.body = None
            if write.deferred is not None:
                write.deferred.callback(result)


def take_lock(queue_dir: Path) -> int | None:
    """The queue's lock, or None when another process holds it."""
    fd = os.open(queue_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
