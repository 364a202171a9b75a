"""The durable queue: qmail-queue's promise (250 only once the message is on
disk) kept with a log-structured layout instead of a file per message.

Why a log: one 10 KiB message as qmail stores it costs several file creates,
renames and deletes; on ext4 every delete makes later creates slower for
minutes.  Here accepted messages are appended to a segment file and many
concurrent sessions share one fdatasync (group commit, on a writer thread, so
the reactor never waits on the disk).  Delivery results are appended as small
records to the message's own segment; a segment file is removed once every
message in it has ended, so deletes are rare (one per segment, not per message).

Layout of ``HOME/queue``::

    seg/NNNNNNNNNNNN   segment logs, named by the first message id they hold
    corrupt/           segment files (or copies) that could not be read cleanly
    rm/                removal requests from ``qtwist queue rm`` while the server runs
    todo/              messages from ``qtwist sendmail``, waiting for the server to queue them
    flush              touched by ``qtwist queue flush``: retry everything now
    lock               flock-ed by the running server

Each record: ``QTW1`` kind(1) id(u64) length(u32) crc32(u32), then the payload.
Kinds: ``M`` message (u32 envelope length, envelope JSON, message bytes with LF
line ends), ``D`` one recipient resolved, ``T`` a deferral (next try),
``E`` the message ended (delivered, bounced or removed).

A todo/ file is ``QTWTODO1``, a line of envelope JSON (sender, recipients),
then the message bytes (LF line ends); it appears under its name only once it
is whole and fsynced, so any file found there is complete.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import queue as threadqueue
import secrets
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger(namespace="qtwist.queue")

MAGIC = b"QTW1"
HEADER = struct.Struct(">4scQII")
ENVELOPE_LENGTH = struct.Struct(">I")
SEGMENT_LIMIT = 32 * 1024 * 1024

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
BOUNCED = "bounced"  # failed, and the bounce that reports it is already queued


class QueueError(Exception):
    """A queue operation that cannot be done; the text says why."""


@dataclass(slots=True)
class Recipient:
    address: str
    channel: str  # "local" or "remote"
    state: str = PENDING
    text: str = ""
    next_try: float = 0.0


@dataclass(eq=False)
class Segment:
    """One segment file.  ``size``, ``fd`` and ``sealed`` belong to the writer
    thread; ``live`` (ids of messages not ended) to the reactor thread."""

    number: int
    path: Path
    size: int = 0
    fd: int | None = None
    sealed: bool = False
    live: set[int] = field(default_factory=set)
    read_fd: int | None = None

    def pread(self, length: int, offset: int) -> bytes:
        if self.read_fd is None:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self.read_fd, length, offset)

    def close(self) -> None:
        for fd in (self.fd, self.read_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.read_fd = None


@dataclass(eq=False, slots=True)
class QueuedMessage:
    """What the queue knows of one message; ``body`` is kept only while fresh."""

    id: int
    born: float
    sender: str
    recipients: list[Recipient]
    size: int
    segment: Segment | None = None
    offset: int = 0
    body: bytes | None = None

    @property
    def qid(self) -> str:
        return str(self.id)

    def read_body(self) -> bytes:
        """The message bytes (blocking when not cached: call from a thread)."""
        if self.body is not None:
            return self.body
        assert self.segment is not None
        return self.segment.pread(self.size, self.offset)

    @property
    def resolved(self) -> bool:
        return all(r.state != PENDING for r in self.recipients)


# -- record encoding -----------------------------------------------------

def _record(kind: bytes, message_id: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, kind, message_id, len(payload), zlib.crc32(payload)) + payload


def message_record(message_id: int, born: float, sender: str, recipients: list[Recipient],
                   body: bytes) -> tuple[bytes, int]:
    """The M record and the offset of the body inside it."""
    envelope = json.dumps({"born": born, "sender": sender,
                           "rcpt": [[r.address, r.channel] for r in recipients]},
                          separators=(",", ":")).encode()
    head = ENVELOPE_LENGTH.pack(len(envelope)) + envelope
    payload_crc = zlib.crc32(body, zlib.crc32(head))
    header = HEADER.pack(MAGIC, b"M", message_id, len(head) + len(body), payload_crc)
    return header + head + body, len(header) + len(head)


def result_record(message_id: int, index: int, recipient: Recipient) -> bytes:
    fields = {"i": index, "s": recipient.state, "t": recipient.text}
    return _record(b"D", message_id, json.dumps(fields, separators=(",", ":")).encode())


def deferral_record(message_id: int, index: int, next_try: float, text: str) -> bytes:
    fields = {"i": index, "n": next_try, "t": text}
    return _record(b"T", message_id, json.dumps(fields, separators=(",", ":")).encode())


def end_record(message_id: int, why: str) -> bytes:
    return _record(b"E", message_id, why.encode())


@dataclass
class ScanResult:
    messages: dict[int, QueuedMessage]
    segments: list[Segment]
    max_id: int
    problems: list[str]


def _parse_segment(segment: Segment, data: bytes | mmap.mmap, messages: dict[int, QueuedMessage],
                   problems: list[str]) -> tuple[int, int, bool]:
    """Apply one segment's records to ``messages``.

    Returns (max id seen, length of the clean prefix, whether a bad record was
    met before the end).  A bad record is skipped by searching for the next
    magic; one at the very end is a torn write that never got its 250.
    """
    position, end, max_id, clean_end, damaged = 0, len(data), 0, 0, False
    while position < end:
        if end - position < HEADER.size:
            break
        magic, kind, message_id, length, crc = HEADER.unpack_from(data, position)
        payload_start = position + HEADER.size
        payload_end = payload_start + length
        if magic != MAGIC or payload_end > end or zlib.crc32(data[payload_start:payload_end]) != crc:
            following = data.find(MAGIC, position + 1)
            if following == -1:
                break  # torn tail
            damaged = True
            problems.append(f"queue/seg/{segment.path.name}: damaged record at offset {position}, skipped")
            position = following
            continue
        _apply(kind, message_id, data, payload_start, payload_end, segment, messages)
        max_id = max(max_id, message_id)
        position = clean_end = payload_end
    return max_id, clean_end, damaged


def _apply(kind: bytes, message_id: int, data, start: int, end: int, segment: Segment,
           messages: dict[int, QueuedMessage]) -> None:
    if kind == b"M":
        (envelope_length,) = ENVELOPE_LENGTH.unpack_from(data, start)
        envelope = json.loads(bytes(data[start + 4:start + 4 + envelope_length]))
        body_offset = start + 4 + envelope_length
        recipients = [Recipient(address, channel) for address, channel in envelope["rcpt"]]
        messages[message_id] = QueuedMessage(message_id, envelope["born"], envelope["sender"], recipients,
                                             end - body_offset, segment, body_offset)
        segment.live.add(message_id)
        return
    message = messages.get(message_id)
    if message is None:
        return
    if kind == b"E":
        del messages[message_id]
        if message.segment is not None:
            message.segment.live.discard(message_id)
        return
    fields = json.loads(bytes(data[start:end]))
    recipient = message.recipients[fields["i"]]
    if kind == b"D":
        recipient.state, recipient.text = fields["s"], fields["t"]
    elif kind == b"T":
        recipient.next_try, recipient.text = fields["n"], fields["t"]


def scan(queue_dir: Path, repair: bool = False) -> ScanResult:
    """Read every segment.  With ``repair`` (the server at start, holding the
    lock) torn tails are cut off and unreadable files moved to corrupt/."""
    messages: dict[int, QueuedMessage] = {}
    segments: list[Segment] = []
    problems: list[str] = []
    max_id = 0
    seg_dir = queue_dir / "seg"
    try:
        names = sorted(os.listdir(seg_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        path = seg_dir / name
        if not name.isdigit():
            if repair:
                _move_aside(queue_dir, path, problems, "not a segment name")
            continue
        segment = Segment(int(name), path)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                data: bytes | mmap.mmap = (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                                           if size else b"")
        except FileNotFoundError:
            continue  # removed by the server while we looked
        try:
            if size and data[:4] != MAGIC:
                if repair:
                    _move_aside(queue_dir, path, problems, "does not start with a queue record")
                else:
                    problems.append(f"queue/seg/{name}: not a queue segment")
                continue
            seen, clean_end, damaged = _parse_segment(segment, data, messages, problems)
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
        max_id = max(max_id, seen, segment.number)
        if repair and damaged:
            corrupt = queue_dir / "corrupt"
            corrupt.mkdir(exist_ok=True)
            shutil.copyfile(path, corrupt / f"{name}.{int(time.time())}")
            problems.append(f"queue/seg/{name}: a copy is kept in queue/corrupt/ for inspection")
        if repair and clean_end < size:
            with open(path, "r+b") as handle:
                handle.truncate(clean_end)
                os.fsync(handle.fileno())
            problems.append(f"queue/seg/{name}: cut {size - clean_end} bytes of an unfinished write")
            size = clean_end
        segment.size = size
        segment.sealed = True
        segments.append(segment)
    return ScanResult(messages, segments, max_id, problems)


def _move_aside(queue_dir: Path, path: Path, problems: list[str], why: str) -> None:
    corrupt = queue_dir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    target = corrupt / f"{path.name}.{int(time.time())}"
    os.replace(path, target)
    problems.append(f"queue/{path.parent.name}/{path.name}: {why}; moved to queue/corrupt/{target.name}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the writer thread ---------------------------------------------------

@dataclass(eq=False)
class _Write:
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


class _Writer(threading.Thread):
    """Appends records and makes them durable, many per fdatasync."""

    def __init__(self, seg_dir: Path, next_number: Callable[[], int], reactor,
                 committed: Callable[[list[_Write], list[Segment]], None]):
        super().__init__(name="qtwist-queue-writer", daemon=True)
        self.seg_dir = seg_dir
        self.next_number = next_number
        self.reactor = reactor
        self.committed = committed
        self.inbox: threadqueue.SimpleQueue = threadqueue.SimpleQueue()
        self.active: Segment | None = None
        self.unsynced: set[Segment] = set()

    def submit(self, item: list[_Write] | Segment | None) -> None:
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
            writes = [item for item in batch if isinstance(item, _Write)]
            sealed = self._write_batch(writes) if writes else []
            for item in batch:
                if isinstance(item, Segment):
                    self._unlink(item)
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

    def _activate(self) -> tuple[Segment, Segment | None]:
        """The segment new messages go to, and the one just retired if full."""
        retired = None
        if self.active is not None and self.active.size >= SEGMENT_LIMIT:
            self.active.sealed = True
            retired = self.active
        if self.active is None or self.active.sealed:
            number = self.next_number()
            self.active = Segment(number, self.seg_dir / f"{number:012d}")
        return self.active, retired

    def _write_batch(self, writes: list[_Write]) -> list[Segment]:
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
                segment.fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
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
                _fsync_dir(self.seg_dir)
            except OSError as error:
                for write in writes:
                    write.error = write.error or error
        return sealed

    def _rollback(self, segment: Segment, start: int, writes: list[_Write], error: OSError) -> None:
        """A failed write (disk full) must leave no partial record behind."""
        try:
            os.ftruncate(segment.fd, start)
        except OSError:
            pass
        segment.size = start
        for write in writes:
            if write.segment is segment:
                write.error = error


# -- the server's queue ---------------------------------------------------

class Queue:
    """The running server's queue: accept durably, record results, end messages.

    Only one process may own a queue; ``open`` takes HOME/queue/lock.
    """

    def __init__(self, home: Path, reactor):
        self.dir = home / "queue"
        self.reactor = reactor
        self.messages: dict[int, QueuedMessage] = {}
        self._next_id = 1
        self._lock_fd: int | None = None
        self._writer: _Writer | None = None
        self._outbox: list[_Write] = []

    def open(self) -> list[QueuedMessage]:
        """Lock, recover what was acknowledged, start the writer; returns the
        messages that still need work."""
        for sub in ("seg", "rm"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        make_todo_dir(self.dir / "todo")
        self._lock_fd = _take_lock(self.dir)
        if self._lock_fd is None:
            raise QueueError(f"{self.dir} is in use by another qtwist server")
        result = scan(self.dir, repair=True)
        for problem in result.problems:
            log.warn("queue: {problem}", problem=problem)
        for segment in result.segments:
            if not segment.live:
                os.unlink(segment.path)
        self.messages = result.messages
        self._next_id = max(result.max_id + 1, int(time.time() * 1000))
        self._writer = _Writer(self.dir / "seg", self._allocate, self.reactor, self._committed)
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
        lock = _take_lock(self.dir)
        if lock is None:
            return False
        os.close(lock)
        return True

    def _allocate(self) -> int:
        number = self._next_id
        self._next_id += 1
        return number

    def accept(self, sender: str, recipients: list[tuple[str, str]], body: bytes) -> Deferred:
        """Queue a message; the Deferred fires with the QueuedMessage once it is
        fsynced (the moment the SMTP server may say 250), or fails with QueueError."""
        message = QueuedMessage(self._allocate(), time.time(), sender,
                                [Recipient(address, channel) for address, channel in recipients],
                                len(body), body=body)
        data, body_offset = message_record(message.id, message.born, sender, message.recipients, body)
        deferred = Deferred()
        self._submit(_Write(data, None, deferred, message=message, body_offset=body_offset))
        return deferred

    def record_result(self, message: QueuedMessage, index: int) -> None:
        """Note a recipient's final state (delivered or failed) in the log."""
        self._submit(_Write(result_record(message.id, index, message.recipients[index]), message.segment,
                            durable=False))

    def record_deferral(self, message: QueuedMessage, index: int) -> None:
        recipient = message.recipients[index]
        self._submit(_Write(deferral_record(message.id, index, recipient.next_try, recipient.text),
                            message.segment, durable=False))

    def end(self, message: QueuedMessage, why: str) -> Deferred:
        """The message is done with (delivered, bounced or removed); an admin's
        removal is made durable at once."""
        deferred = Deferred()
        self._submit(_Write(end_record(message.id, why), message.segment, deferred, ending=message,
                            durable=why == "removed"))
        return deferred

    def _submit(self, item: _Write) -> None:
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

    def _committed(self, writes: list[_Write], sealed: list[Segment]) -> None:
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


def _take_lock(queue_dir: Path) -> int | None:
    """The queue's lock, or None when another process holds it."""
    fd = os.open(queue_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# -- what the qtwist command uses -------------------------------------------

def queue_stat(home: Path) -> tuple[int, int]:
    """(messages in queue, not yet preprocessed).  A message accepted by SMTP
    is preprocessed at once, so the second number counts what ``qtwist
    sendmail`` left in todo/ and the server has not taken yet."""
    result = scan(home / "queue")
    try:
        waiting = sum(1 for name in os.listdir(home / "queue" / "todo") if not name.startswith("."))
    except FileNotFoundError:
        waiting = 0
    return len(result.messages), waiting


def queue_read(home: Path) -> list[QueuedMessage]:
    """Every message in the queue, oldest first."""
    return sorted(scan(home / "queue").messages.values(), key=lambda m: (m.born, m.id))


def _matching(messages: dict[int, QueuedMessage], ids: list[str], match: str | None) -> list[QueuedMessage]:
    chosen: dict[int, QueuedMessage] = {}
    for text in ids:
        if not text.isdigit() or int(text) not in messages:
            raise QueueError(f"no message {text} in the queue")
        chosen[int(text)] = messages[int(text)]
    if match:
        needle = match.lower()
        for message in messages.values():
            addresses = [message.sender] + [r.address for r in message.recipients]
            if any(needle in address.lower() for address in addresses):
                chosen[message.id] = message
    return list(chosen.values())


def queue_remove(home: Path, ids: list[str], match: str | None, wait: float = 30.0) -> int:
    """Remove messages by id or by a substring of their envelope addresses.

    With the server running, the server does it (it owns the queue): a request
    file goes to queue/rm/ and this waits until the server has taken it.
    """
    queue_dir = home / "queue"
    result = scan(queue_dir)
    chosen = _matching(result.messages, ids, match)
    if not chosen:
        return 0
    lock = _take_lock(queue_dir) if queue_dir.is_dir() else None
    if lock is None:
        _request_removal(queue_dir, [m.id for m in chosen], wait)
        return len(chosen)
    try:
        # No server: append the E records ourselves, under the lock.
        by_segment: dict[Path, list[bytes]] = {}
        for message in chosen:
            by_segment.setdefault(message.segment.path, []).append(end_record(message.id, "removed"))
        for path, records in by_segment.items():
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"".join(records))
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        os.close(lock)
    return len(chosen)


def _request_removal(queue_dir: Path, ids: list[int], wait: float) -> None:
    rm_dir = queue_dir / "rm"
    rm_dir.mkdir(exist_ok=True)
    name = f"{time.time_ns()}.{os.getpid()}"
    scratch = rm_dir / f".{name}"
    scratch.write_text(" ".join(map(str, ids)) + "\n")
    os.replace(scratch, rm_dir / name)
    deadline = time.monotonic() + wait
    while (rm_dir / name).exists():
        if time.monotonic() > deadline:
            raise QueueError(f"the server did not take the removal request within {wait:g} s; "
                             f"it stays in queue/rm/{name}")
        time.sleep(0.05)


def take_removal_requests(queue_dir: Path) -> Iterator[int]:
    """For the server: ids asked to be removed; each request file is consumed."""
    rm_dir = queue_dir / "rm"
    try:
        names = [name for name in os.listdir(rm_dir) if not name.startswith(".")]
    except FileNotFoundError:
        return
    for name in names:
        path = rm_dir / name
        try:
            words = path.read_text().split()
        except FileNotFoundError:
            continue
        for word in words:
            if word.isdigit():
                yield int(word)
        path.unlink(missing_ok=True)


def queue_flush(home: Path) -> None:
    """Ask the running server to retry every deferred delivery now."""
    queue_dir = home / "queue"
    if not queue_dir.is_dir():
        raise QueueError(f"{queue_dir} does not exist")
    (queue_dir / "flush").touch()


def take_flush_request(queue_dir: Path) -> bool:
    try:
        os.unlink(queue_dir / "flush")
    except FileNotFoundError:
        return False
    return True


# -- the pickup directory: messages from ``qtwist sendmail`` -----------------------

TODO_MAGIC = b"QTWTODO1\n"
# setgid and sticky, writable by owner and group: the group's members may
# inject, their files get the directory's group so the server can read them,
# and nobody but the owner removes another's file.
TODO_DIR_MODE = 0o3770
TODO_FILE_MODE = 0o640
# The most the server takes in one go, so a flood of injections never holds
# a lot of memory at once; the rest follows at once after.
TODO_BATCH_FILES = 256
TODO_BATCH_BYTES = 32 * 1024 * 1024
# An unfinished file (its writer died) older than this is removed, as
# qmail-clean removes old temporary files.
TODO_SCRATCH_LIFETIME = 36 * 3600


@dataclass(eq=False)
class TodoMessage:
    """A message waiting in todo/; ``uid`` owns the file, so it says who
    injected it in a way the injecting user cannot forge."""

    path: Path
    uid: int
    sender: str
    recipients: list[str]
    body: bytes


@dataclass
class TodoBatch:
    messages: list[TodoMessage]
    problems: list[str]
    more: bool  # files were left for the next batch


def make_todo_dir(todo: Path) -> None:
    """todo/ with TODO_DIR_MODE when it does not exist yet; an existing one
    keeps the mode the admin gave it."""
    todo.parent.mkdir(parents=True, exist_ok=True)
    try:
        todo.mkdir()
    except FileExistsError:
        return
    os.chmod(todo, TODO_DIR_MODE)


def drop_todo(home: Path, sender: str, recipients: list[str], body: bytes) -> Path:
    """Leave a message for the server in queue/todo/ and return its path once
    it is durable: written under a dot name, fsynced, renamed into place, and
    the directory fsynced."""
    todo = home / "queue" / "todo"
    make_todo_dir(todo)
    envelope = json.dumps({"sender": sender, "rcpt": recipients}, separators=(",", ":")).encode()
    name = f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
    scratch, final = todo / f".{name}", todo / name
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TODO_FILE_MODE)
    try:
        os.fchmod(fd, TODO_FILE_MODE)  # whatever the umask: the server must read it
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(TODO_MAGIC + envelope + b"\n" + body)
        os.fsync(fd)
        os.rename(scratch, final)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    _fsync_dir(todo)
    return final


def parse_todo(data: bytes) -> tuple[str, list[str], bytes]:
    """(sender, recipients, message) of a todo/ file; ValueError if it is not one."""
    if not data.startswith(TODO_MAGIC):
        raise ValueError("not a qtwist sendmail file")
    line_end = data.find(b"\n", len(TODO_MAGIC))
    if line_end < 0:
        raise ValueError("no envelope line")
    envelope = json.loads(data[len(TODO_MAGIC):line_end])
    sender = envelope.get("sender") if isinstance(envelope, dict) else None
    recipients = envelope.get("rcpt") if isinstance(envelope, dict) else None
    if (not isinstance(sender, str) or not isinstance(recipients, list) or not recipients
            or not all(isinstance(r, str) and r for r in recipients)):
        raise ValueError("the envelope needs a sender and at least one recipient")
    return sender, recipients, data[line_end + 1:]


def take_todo(queue_dir: Path) -> TodoBatch:
    """For the server, in a worker thread: the oldest waiting messages, at most
    a batch.  A file that cannot be read or parsed is moved to corrupt/ (and
    named in ``problems``); the caller removes the others once queued."""
    todo = queue_dir / "todo"
    try:
        names = sorted(os.listdir(todo))
    except FileNotFoundError:
        return TodoBatch([], [], False)
    batch = TodoBatch([], [], False)
    size = 0
    for name in names:
        path = todo / name
        if name.startswith("."):
            _remove_stale_scratch(path, batch.problems)
            continue
        if len(batch.messages) >= TODO_BATCH_FILES or size >= TODO_BATCH_BYTES:
            batch.more = True
            break
        try:
            with open(path, "rb") as handle:
                uid = os.fstat(handle.fileno()).st_uid
                data = handle.read()
            sender, recipients, body = parse_todo(data)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            try:
                _move_aside(queue_dir, path, batch.problems, f"cannot be queued ({why})")
            except OSError as moving:
                batch.problems.append(f"queue/todo/{name}: cannot be queued ({why}) nor moved aside "
                                      f"({moving.strerror})")
            continue
        batch.messages.append(TodoMessage(path, uid, sender, recipients, body))
        size += len(body)
    return batch


def _remove_stale_scratch(path: Path, problems: list[str]) -> None:
    try:
        if path.stat().st_mtime < time.time() - TODO_SCRATCH_LIFETIME:
            path.unlink()
            problems.append(f"queue/todo/{path.name}: an unfinished file from a sendmail that died; removed")
    except FileNotFoundError:
        pass


def remove_todo(queue_dir: Path, paths: list[Path]) -> None:
    """For the server, in a worker thread: these are queued now; forget them."""
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        _fsync_dir(queue_dir / "todo")
