"""The queue's writer thread: appends records and makes them durable, many
per fdatasync (group commit), so no session waits on the disk alone and the
reactor never waits on it at all."""

from __future__ import annotations

import errno
import json
import math
import os
import queue as threadqueue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from qtwist.fsutil import fsync_directory
from qtwist.queue.index import Index, State, decode_recipients
from qtwist.queue.records import PENDING, SEGMENT_LIMIT, QueuedMessage, Records, Segment

log = Logger(namespace="qtwist.queue")

# A new message still held this long (seconds) enters the index.
INDEX_AFTER = 5.0
# A batch that changes nothing in the index moves its marks of what it
# applied at most this often (seconds).
MARK_EVERY = 1.0
# Messages one step of compaction moves, so the records of sessions waiting
# on the writer are never held up long.
COMPACT_CHUNK = 500


@dataclass(eq=False)
class Write:
    """One record for the writer.  ``segment`` None means: the active segment
    (a new message, ``message``); the writer fills in where it went.
    ``ending`` is the message an E record ends; ``changed`` one whose
    recipients changed (the index, if it holds the message, learns their
    state as it is when the record is written: never older than the
    record).  A ``durable`` record is fdatasynced before its Deferred fires;
    the others (results, retry times, ends) reach the disk with the next
    fdatasync of their file or at close: losing them in a crash repeats a
    delivery, never loses a message."""

    data: bytes
    segment: Segment | None
    deferred: Deferred | None = None
    durable: bool = True
    message: QueuedMessage | None = None
    body_offset: int = 0
    ending: QueuedMessage | None = None
    changed: QueuedMessage | None = None
    offset: int = 0
    error: OSError | None = None


@dataclass(eq=False)
class Work:
    """Something to do with the index on the writer's thread, in order with
    the records: ``job(writer)``'s result fires ``deferred`` on the reactor."""

    job: Callable[[Writer], object]
    deferred: Deferred | None = None


class Writer(threading.Thread):
    """Appends records and makes them durable, many per fdatasync; keeps the
    index up to date and removes segments once no message lives in them."""

    def __init__(self, seg_dir: Path, records: Records, next_number: Callable[[], int], reactor,
                 committed: Callable[[list[Write]], None], index: Index,
                 segments: dict[int, Segment]):
        super().__init__(name="qtwist-queue-writer", daemon=True)
        self.seg_dir = seg_dir
        self.records = records
        self.next_number = next_number
        self.reactor = reactor
        self.committed = committed
        self.index = index
        self.segments = segments
        self.inbox: threadqueue.SimpleQueue = threadqueue.SimpleQueue()
        self.active: Segment | None = None
        self.unsynced: set[Segment] = set()
        # New messages the index has not heard of, per segment, oldest first:
        # id -> (offset of the M record, the message, when it was written).
        self.fresh: dict[Segment, dict[int, tuple[int, QueuedMessage, float]]] = {}
        # Segments being compacted whose messages the index gives the server
        # none of meanwhile (Queue.compact).
        self.compacting: set[int] = set()
        # Segments written to since the index's marks last moved, and when that was.
        self.unmarked: set[Segment] = set()
        self.marked_at = -math.inf

    def submit(self, item: list[Write | Work] | None) -> None:
        """Records and work, in order, or None to stop."""
        self.inbox.put(item)

    def run(self) -> None:
        while True:
            batch: list = []
            item = self.inbox.get()
            while True:
                if item is None:
                    batch.append(None)
                else:
                    batch.extend(item)
                try:
                    item = self.inbox.get_nowait()
                except threadqueue.Empty:
                    break
            writes = [item for item in batch if isinstance(item, Write)]
            sealed: list[Segment] = []
            try:
                sealed = self._write_batch(writes) if writes else []
            except Exception as error:  # a bug must not stop the writer: every session waiting hears of it
                log.failure("queue: the writer failed; the records of this batch are not written")
                for write in writes:
                    write.error = write.error or OSError(errno.EIO, f"internal error ({error!r})")
            if writes:
                # The 250s first: qstat counts a message the index has not
                # applied yet from the segment, beyond the index's mark.
                self.reactor.callFromThread(self.committed, writes)
                self._keep_index(writes, sealed)
            for item in batch:
                if isinstance(item, Work):
                    self._work(item)
            if None in batch:
                self._index_the_rest()
                self._sync_the_rest()
                if self.active is not None and self.active.fd is not None:
                    os.close(self.active.fd)
                    self.active.fd = None
                self.index.close()
                return

    def _keep_index(self, writes: list[Write], sealed: list[Segment]) -> None:
        """The index learns what the batch wrote; segments left with no
        message are removed.

        Most messages are delivered within moments of their 250: the index
        never hears of them.  A new message enters it once it is let go,
        once it has waited INDEX_AFTER seconds, or at stop; until then the
        index's mark of what it applied of the segment stays before the
        message, so recovery after a crash reads it (and what followed it)
        from the segment again.  A batch that changes nothing in the index
        moves no mark either, unless MARK_EVERY seconds have passed: a mark
        left behind only makes recovery read a little more again.  An error
        here is logged: recovery at the next start reads these records
        again from the segments."""
        now = time.monotonic()
        removed: list[int] = []
        updated: list[tuple[int, State]] = []
        for write in writes:
            if write.error is not None:
                continue
            segment = write.segment
            self.unmarked.add(segment)
            fresh = self.fresh.get(segment)
            if write.message is not None:
                self.fresh.setdefault(segment, {})[write.message.id] = (write.offset, write.message, now)
            elif write.ending is not None:
                if fresh is None or fresh.pop(write.ending.id, None) is None:
                    removed.append(write.ending.id)
            elif write.changed is not None and (fresh is None or write.changed.id not in fresh):
                updated.append((write.changed.id, State.of(write.changed.recipients)))
        due: list[QueuedMessage] = []
        for segment, waiting in self.fresh.items():
            while waiting:
                message_id, (_, message, written) = next(iter(waiting.items()))
                if now - written < INDEX_AFTER:
                    break
                del waiting[message_id]
                due.append(message)
                self.unmarked.add(segment)
        if (not (removed or updated or due or sealed) and now - self.marked_at < MARK_EVERY
                and not any(segment.sealed for segment in self.unmarked)):
            return
        touched, self.unmarked = self.unmarked | set(sealed), set()
        self.marked_at = now
        try:
            with self.index.transaction():
                for message_id in removed:
                    self.index.remove(message_id)
                for message_id, state in updated:
                    self.index.update(message_id, state)
                for message in due:
                    self.index.add(message, held=True)
                for segment in touched:
                    self.index.applied(segment.number, self._applied(segment))
            for segment in touched:
                if segment.sealed and not self.fresh.get(segment) and self.index.segment_empty(segment.number):
                    self.fresh.pop(segment, None)
                    self._unlink(segment)
        except Exception:
            log.failure("queue: the index could not be brought up to date")

    def _applied(self, segment: Segment) -> int:
        """How much of ``segment`` the index reflects: up to its first new
        message the index has not heard of."""
        waiting = self.fresh.get(segment)
        return next(iter(waiting.values()))[0] if waiting else segment.size

    def let_go(self, message: QueuedMessage, state: State) -> None:
        """The server stops holding ``message``: the index keeps it, due when ``state`` says."""
        segment = message.segment
        with self.index.transaction():
            if self.fresh.get(segment, {}).pop(message.id, None) is not None:
                self.index.add(message, held=False)
                self.index.applied(segment.number, self._applied(segment))
            self.index.update(message.id, state, held=False)

    def compact(self, number: int) -> tuple[int, list[int]]:
        """One step of compacting segment ``number`` if it is sealed and
        mostly made of ended messages: up to COMPACT_CHUNK of its live
        messages the server does not hold are written again (with their
        recipients' states) at the end of the active segment, durably, and
        the index then points at the copies, in one transaction with its
        mark of what it applied.  Messages the server holds stay (they move
        once let go); the segment goes once none is left.  A crash at any
        point leaves each message in one place or the other, with the same
        id: recovery takes the copy if the index had not.  Returns how many
        messages moved, and, once none is left to move, the ids of those the
        server holds there."""
        segment = self.segments.get(number)
        if segment is None or not segment.sealed or segment is self.active:
            return 0, []
        if self.index.live_in(number) * 2 >= segment.size:
            return 0, []
        rows = self.index.movable(number, COMPACT_CHUNK)
        if not rows:
            return 0, self.index.held_in(number)
        writes, moving = [], []
        for message_id, offset, size, born, sender, recipients in rows:
            body = segment.pread(size, offset)
            message = QueuedMessage(message_id, born, json.loads(sender), decode_recipients(recipients), size)
            data, body_offset = self.records.message(message_id, born, message.sender, message.recipients, body)
            for index, recipient in enumerate(message.recipients):
                if recipient.state != PENDING:
                    data += self.records.result(message_id, index, recipient)
                elif recipient.next_try or recipient.text:
                    data += self.records.deferral(message_id, index, recipient.next_try, recipient.text)
            writes.append(Write(data, None))
            moving.append((message_id, body_offset))
        self._write_batch(writes)
        if any(write.error is not None for write in writes):
            log.error("queue: compacting {path} failed: {why}", path=str(segment.path),
                      why=next(write.error.strerror for write in writes if write.error is not None))
            return 0, []
        with self.index.transaction():
            for write, (message_id, body_offset) in zip(writes, moving):
                self.index.moved(message_id, write.segment.number, write.offset + body_offset)
            for target in {write.segment for write in writes}:
                self.index.applied(target.number, self._applied(target))
        if not self.fresh.get(segment) and self.index.segment_empty(number):
            self._unlink(segment)
        return len(writes), []

    def _index_the_rest(self) -> None:
        """At stop: new messages still held enter the index, so the next
        start has nothing to read again."""
        with self.index.transaction():
            for segment, waiting in self.fresh.items():
                for _, message, _ in waiting.values():
                    self.index.add(message, held=True)
                waiting.clear()
            for segment in self.unmarked | set(self.fresh):
                self.index.applied(segment.number, segment.size)
            self.unmarked.clear()

    def write_now(self, writes: list[Write]) -> None:
        """For work on this thread: records written, made durable and applied
        to the index at once (their ``error`` says if one failed)."""
        self._keep_index(writes, self._write_batch(writes))

    def _work(self, work: Work) -> None:
        try:
            result = work.job(self)
        except Exception as error:
            log.failure("queue: index work failed")
            if work.deferred is not None:
                self.reactor.callFromThread(work.deferred.errback, error)
            return
        if work.deferred is not None:
            self.reactor.callFromThread(work.deferred.callback, result)

    def _sync_the_rest(self) -> None:
        """At close: what was written without fdatasync goes to disk now."""
        for segment in self.unsynced:
            if segment.fd is not None:
                try:
                    os.fdatasync(segment.fd)
                except OSError as error:
                    log.error("queue: cannot sync {path}: {why}", path=str(segment.path), why=error.strerror)
        self.unsynced.clear()

    def _unlink(self, segment: Segment) -> None:
        self.unsynced.discard(segment)
        self.unmarked.discard(segment)
        segment.close()
        self.segments.pop(segment.number, None)
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as error:  # it stays: recovery at the next start finds only ended messages in it
            log.error("queue: cannot remove {path}: {why}", path=str(segment.path), why=error.strerror)
            return
        with self.index.transaction():
            self.index.drop_segment(segment.number)

    def _activate(self) -> tuple[Segment, Segment | None]:
        """The segment new messages go to, and the one just retired if full."""
        retired = None
        if self.active is not None and self.active.size >= SEGMENT_LIMIT:
            self.active.sealed = True
            retired = self.active
        if self.active is None or self.active.sealed:
            number = self.next_number()
            self.active = self.segments[number] = Segment(number, self.seg_dir / f"{number:012d}", self.records)
        return self.active, retired

    def _write_batch(self, writes: list[Write]) -> list[Segment]:
        """Group by file, one write per file, then one fdatasync per file."""
        chunks: dict[Segment, list[bytes]] = {}
        durable: set[Segment] = set()
        sealed: list[Segment] = []
        created = False
        for write in writes:
            if write.segment is None:
                segment, retired = self._activate()
                if retired is not None:
                    sealed.append(retired)
                write.segment = segment
            segment = write.segment
            if segment.fd is None:
                try:
                    segment.fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                except OSError as error:  # out of descriptors, say: this record fails, the next batch tries again
                    write.error = error
                    continue
                created = True
            write.offset = segment.size
            if write.message is not None:  # not yet seen by any other thread
                write.message.segment, write.message.offset = segment, write.offset + write.body_offset
            segment.size += len(write.data)
            chunks.setdefault(segment, []).append(write.data)
            if write.durable:
                durable.add(segment)
        for segment, parts in chunks.items():
            start = segment.size - sum(map(len, parts))
            try:
                os.write(segment.fd, b"".join(parts))
                if segment in durable:
                    os.fdatasync(segment.fd)
                    self.unsynced.discard(segment)
                else:
                    self.unsynced.add(segment)
            except OSError as error:
                self._rollback(segment, start, writes, error)
        if created:
            try:
                fsync_directory(self.seg_dir)
            except OSError as error:
                for write in writes:
                    write.error = write.error or error
        return sealed

    def _rollback(self, segment: Segment, start: int, writes: list[Write], error: OSError) -> None:
        """A failed write (disk full) must leave no partial record behind."""
        try:
            os.ftruncate(segment.fd, start)
        except OSError:
            pass
        segment.size = start
        for write in writes:
            if write.segment is segment:
                write.error = error
