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

from qtwist.queue.records import QueuedMessage, QueueError, Recipient, Records, Segment, queue_key, scan
from qtwist.queue.todo import make_todo_dir
from qtwist.queue.writer import Write, Writer

log = Logger(namespace="qtwist.queue")


class Queue:
    """The running server's queue: accept durably, record results, end messages.

    Only one process may own a queue; ``open`` takes HOME/queue/lock.
    ``reactor`` runs the writer's hand-overs; ``clock`` (the reactor unless a
    test gives another) stamps each message's birth, which the scheduler's
    retry schedule and queuelifetime count from.
    """

    def __init__(self, home: Path, reactor, clock: IReactorTime | None = None):
        self.dir = home / "queue"
        self.reactor = reactor
        self.clock = clock or reactor
        self.messages: dict[int, QueuedMessage] = {}
        self._next_id = 1
        self._lock_fd: int | None = None
        self._writer: Writer | None = None
        self._outbox: list[Write] = []
        self.records: Records | None = None

    def open(self) -> list[QueuedMessage]:
        """Lock, recover what was acknowledged, start the writer; returns the
        messages that still need work."""
        for sub in ("seg", "rm"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        make_todo_dir(self.dir / "todo")
        self._lock_fd = take_lock(self.dir)
        if self._lock_fd is None:
            raise QueueError(f"{self.dir} is in use by another qtwist server")
        self.records = Records(queue_key(self.dir, create=True).key)
        result = scan(self.dir, repair=True)
        for problem in result.problems:
            log.warn("queue: {problem}", problem=problem)
        for segment in result.segments:
            if not segment.live:
                os.unlink(segment.path)
        self.messages = result.messages
        self._next_id = max(result.max_id + 1, int(self.clock.seconds() * 1000))
        self._writer = Writer(self.dir / "seg", self.records, self._allocate, self.reactor, self._committed)
        self._writer.start()
        return sorted(self.messages.values(), key=lambda m: m.id)

    def close(self) -> Deferred:
        """Let the writer finish what it has, then release the lock."""
        self._hand_over()
        writer, self._writer = self._writer, None
        if writer is None:
            return succeed(None)
        writer.submit(None)
        done = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.join)

        def release(result):
            for message in self.messages.values():
                if message.segment is not None:
                    message.segment.close()
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
                            message.segment,
                            durable=False))

    def record_deferral(self, message: QueuedMessage, index: int) -> None:
        recipient = message.recipients[index]
        self._submit(Write(message.segment.records.deferral(message.id, index, recipient.next_try, recipient.text),
                            message.segment, durable=False))

    def end(self, message: QueuedMessage, why: str) -> Deferred:
        """The message is done with (delivered, bounced or removed); an admin's
        removal is made durable at once."""
        deferred = Deferred()
        self._submit(Write(message.segment.records.end(message.id, why), message.segment, deferred, ending=message,
                            durable=why == "removed"))
        return deferred

    def _submit(self, item: Write) -> None:
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

    def _committed(self, writes: list[Write], sealed: list[Segment]) -> None:
        """On the reactor thread: a batch is durable (or failed)."""
        for write in writes:
            if write.error is not None:
                if write.deferred is not None:
                    write.deferred.errback(QueueError(f"queue write failed: {write.error.strerror}"))
                continue
            result = None
            if write.message is not None:
                message = write.message
                message.segment = write.segment
                message.offset = write.offset + write.body_offset
                write.segment.live.add(message.id)
                self.messages[message.id] = message
                result = message
            elif write.ending is not None:
                ending = write.ending
                self.messages.pop(ending.id, None)
                ending.body = None
                segment = ending.segment
                segment.live.discard(ending.id)
                if segment.sealed and not segment.live:
                    self._writer.submit(segment)
            if write.deferred is not None:
                write.deferred.callback(result)
        for segment in sealed:
            if not segment.live:
                self._writer.submit(segment)


def take_lock(queue_dir: Path) -> int | None:
    """The queue's lock, or None when another process holds it."""
    fd = os.open(queue_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
