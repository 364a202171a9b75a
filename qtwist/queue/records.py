"""The queue's record format, and reading segments back.

Each record: ``QTW1`` kind(1) id(u64) length(u32) crc32(u32), then the payload.
Kinds: ``M`` message (u32 envelope length, envelope JSON, message bytes with LF
line ends), ``D`` one recipient resolved, ``T`` a deferral (next try),
``E`` the message ended (delivered, bounced or removed).

``scan`` rebuilds what the queue holds from its segments: at the server's
start (repairing torn tails) and for ``qtwist qstat``/``qread`` (read only).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

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
    envelope = json.dumps({"born": born, "sender": sender, "rcpt": [r.address for r in recipients]},
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
        recipients = [Recipient(_address(entry)) for entry in envelope["rcpt"]]
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


def _address(entry: str | list[str]) -> str:
    """A recipient of an M record; queues written before routing moved to the
    scheduler hold [address, channel] pairs."""
    return entry if isinstance(entry, str) else entry[0]


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
                move_aside(queue_dir, path, problems, "not a segment name")
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
                    move_aside(queue_dir, path, problems, "does not start with a queue record")
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


def move_aside(queue_dir: Path, path: Path, problems: list[str], why: str) -> None:
    corrupt = queue_dir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    target = corrupt / f"{path.name}.{int(time.time())}"
    os.replace(path, target)
    problems.append(f"queue/{path.parent.name}/{path.name}: {why}; moved to queue/corrupt/{target.name}")
