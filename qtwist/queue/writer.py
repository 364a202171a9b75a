"""The queue's writer thread: appends records and makes them durable, many
per fdatasync (group commit), so no session waits on the disk alone and the
reactor never waits on it at all."""

from __future__ import annotations

import errno
import os
import queue as threadqueue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from qtwist.fsutil import fsync_directory
from qtwist.queue.records import SEGMENT_LIMIT, QueuedMessage, Records, Segment

log = Logger(namespace="qtwist.queue")


@dataclass(eq=False)
class Write:
    """One record for the writer.  ``segment`` None means: the active segment
    (a new message, ``message``); the writer fills in where it went.
    ``ending`` is the message an E record ends.  A ``durable`` record is
    fdatasynced before its Deferred fires; the others (results, retry times,
    ends) reach the disk with the next fdatasync of their file or at close:
    losing them in a crash repeats a delivery, never loses a message."""

    data: bytes
    segment: Segment | None
    deferred: Deferred | None = None
    durable: bool = True
    message: QueuedMessage | None = None
    body_offset: int = 0
    ending: QueuedMessage | None = None
    offset: int = 0
    error: OSError | None = None


class Writer(threading.Thread):
    """Appends records and makes them durable, many per fdatasync."""

    def __init__(self, seg_dir: Path, records: Records, next_number: Callable[[], int], reactor,
                 committed: Callable[[list[Write], list[Segment]], None]):
        super().__init__(name="qtwist-queue-writer", daemon=True)
        self.seg_dir = seg_dir
        self.records = records
        self.next_number = next_number
        self.reactor = reactor
        self.committed = committed
        self.inbox: threadqueue.SimpleQueue = threadqueue.SimpleQueue()
        self.active: Segment | None = None
        self.unsynced: set[Segment] = set()

    def submit(self, item: list[Write] | Segment | None) -> None:
        """Records to write, a finished segment to remove, or None to stop."""
        self.inbox.put(item)

    def run(self) -> None:
        while True:
            batch: list = []
            item = self.inbox.get()
            while True:
                if isinstance(item, list):
                    batch.extend(item)
                else:
                    batch.append(item)
                try:
                    item = self.inbox.get_nowait()
                except threadqueue.Empty:
                    break
            stopping = None in batch
            writes = [item for item in batch if isinstance(item, Write)]
            try:
                sealed = self._write_batch(writes) if writes else []
                for item in batch:
                    if isinstance(item, Segment):
                        self._unlink(item)
            except Exception as error:  # a bug must not stop the writer: every session waiting hears of it
                log.failure("queue: the writer failed; the records of this batch are not written")
                sealed = []
                for write in writes:
                    write.error = write.error or OSError(errno.EIO, f"internal error ({error!r})")
            if writes:
                self.reactor.callFromThread(self.committed, writes, sealed)
            if stopping:
                self._sync_the_rest()
                if self.active is not None and self.active.fd is not None:
                    os.close(self.active.fd)
                    self.active.fd = None
                return

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
        segment.close()
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as error:  # it stays: recovery at the next start finds only ended messages in it
            log.error("queue: cannot remove {path}: {why}", path=str(segment.path), why=error.strerror)

    def _activate(self) -> tuple[Segment, Segment | None]:
        """The segment new messages go to, and the one just retired if full."""
        retired = None
        if self.active is not None and self.active.size >= SEGMENT_LIMIT:
            self.active.sealed = True
            retired = self.active
        if self.active is None or self.active.sealed:
            number = self.next_number()
            self.active = Segment(number, self.seg_dir / f"{number:012d}", self.records)
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
