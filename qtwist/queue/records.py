"""The queue's record format, and reading segments back.

Each record: ``QTW2`` kind(1) id(u64) length(u32) crc32(u32) mac(16), then the
payload.  The MAC (keyed BLAKE2b over kind, id, length and crc, with the key
in queue/key) makes a header only the server can write: after damage, scan
looks for the next header it can verify, so a record quoted inside a message
body (a mailed segment, or a forged one) is never taken for a real one.
Queues written before keep their ``QTW1`` segments (the same header without
MAC); they are read, and appended to, in their own format.

Kinds: ``M`` message (u32 envelope length, envelope JSON, message bytes with
LF line ends), ``D`` one recipient resolved, ``T`` a deferral (next try),
``E`` the message ended (delivered, bounced or removed).

``scan`` rebuilds what the queue holds from its segments: at the server's
start (repairing torn tails) and for ``qtwist qstat``/``qread`` (read only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from qtwist.fsutil import replace_file
from qtwist.numbers import decimal

MAGIC, LEGACY_MAGIC = b"QTW2", b"QTW1"
FIELDS = struct.Struct(">cQII")  # kind, message id, payload length, payload crc32
MAC_SIZE, KEY_SIZE = 16, 32
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
    records: Records
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

class Records:
    """Writes and recognises one segment format's records: with a ``key``
    the authenticated QTW2 headers, without one the QTW1 of older queues."""

    def __init__(self, key: bytes | None):
        self.key = key
        self.magic = MAGIC if key is not None else LEGACY_MAGIC
        self.header_size = len(self.magic) + FIELDS.size + (MAC_SIZE if key is not None else 0)

    def _mac(self, fields: bytes) -> bytes:
        if self.key is None:
            return b""
        return hashlib.blake2b(fields, key=self.key, digest_size=MAC_SIZE).digest()

    def _header(self, kind: bytes, message_id: int, length: int, crc: int) -> bytes:
        fields = FIELDS.pack(kind, message_id, length, crc)
        return self.magic + fields + self._mac(fields)

    def header_at(self, data: bytes | mmap.mmap, position: int) -> tuple[bytes, int, int, int] | None:
        """(kind, id, length, crc) of the header at ``position``, or None when
        no header this format can verify starts there."""
        if data[position:position + len(self.magic)] != self.magic:
            return None
        start = position + len(self.magic)
        fields = bytes(data[start:start + FIELDS.size])
        if len(fields) < FIELDS.size:
            return None
        mac = bytes(data[start + FIELDS.size:position + self.header_size])
        if not hmac.compare_digest(mac, self._mac(fields)):
            return None
        return FIELDS.unpack(fields)

    def next_header(self, data: bytes | mmap.mmap, position: int) -> int:
        """Where the first verifiable header at or after ``position`` starts; -1 if none."""
        while (position := data.find(self.magic, position)) != -1:
            if self.header_at(data, position) is not None:
                return position
            position += 1
        return -1

    def _record(self, kind: bytes, message_id: int, payload: bytes) -> bytes:
        return self._header(kind, message_id, len(payload), zlib.crc32(payload)) + payload

    def message(self, message_id: int, born: float, sender: str, recipients: list[Recipient],
                body: bytes) -> tuple[bytes, int]:
        """The M record and the offset of the body inside it."""
        envelope = json.dumps({"born": born, "sender": sender, "rcpt": [r.address for r in recipients]},
                              separators=(",", ":")).encode()
        head = ENVELOPE_LENGTH.pack(len(envelope)) + envelope
        header = self._header(b"M", message_id, len(head) + len(body), zlib.crc32(body, zlib.crc32(head)))
        return header + head + body, len(header) + len(head)

    def result(self, message_id: int, index: int, recipient: Recipient) -> bytes:
        fields = {"i": index, "s": recipient.state, "t": recipient.text}
        return self._record(b"D", message_id, json.dumps(fields, separators=(",", ":")).encode())

    def deferral(self, message_id: int, index: int, next_try: float, text: str) -> bytes:
        fields = {"i": index, "n": next_try, "t": text}
        return self._record(b"T", message_id, json.dumps(fields, separators=(",", ":")).encode())

    def end(self, message_id: int, why: str) -> bytes:
        return self._record(b"E", message_id, why.encode())


LEGACY = Records(None)


class QueueKey(NamedTuple):
    key: bytes
    first_segment: int  # segments numbered below were written without the key (QTW1)


KEY_FILE = struct.Struct(f">{KEY_SIZE}sQ")


def queue_key(queue_dir: Path, create: bool = False) -> QueueKey | None:
    """The queue's MAC key (queue/key); ``create`` makes one when there is none.

    The file also names the first segment written under the key: older ones
    are read as QTW1, newer ones only as QTW2, so a damaged or forged segment
    cannot pass for an old one."""
    path = queue_dir / "key"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
        numbers = [decimal(name) for name in os.listdir(queue_dir / "seg")]
        data = KEY_FILE.pack(os.urandom(KEY_SIZE), max((n for n in numbers if n is not None), default=-1) + 1)
        replace_file(path, data)
    if len(data) != KEY_FILE.size:
        raise QueueError(f"{path} is damaged: {len(data)} bytes, not {KEY_FILE.size}")
    return QueueKey(*KEY_FILE.unpack(data))


@dataclass
class ScanResult:
    messages: dict[int, QueuedMessage]
    segments: list[Segment]
    max_id: int
    problems: list[str]


@dataclass
class _Parsed:
    max_id: int = 0
    clean_end: int = 0  # the length of the prefix that ends with a whole record
    damaged: bool = False  # a bad record was met before the end
    recognised: bool = False  # at least one header verified


def _parse_segment(segment: Segment, data: bytes | mmap.mmap, messages: dict[int, QueuedMessage],
                   problems: list[str]) -> _Parsed:
    """Apply one segment's records to ``messages``.

    A header that does not verify is skipped to the next one that does; a
    record whose payload fails its CRC is skipped by its (verified) length.
    A header or payload cut short at the very end is a torn write that never
    got its 250.
    """
    records, parsed = segment.records, _Parsed()
    position, end = 0, len(data)
    while end - position >= records.header_size:
        header = records.header_at(data, position)
        if header is None:
            following = records.next_header(data, position + 1)
            if following == -1:
                break  # torn tail
            parsed.damaged = True
            problems.append(f"queue/seg/{segment.path.name}: damaged record at offset {position}, skipped")
            position = following
            continue
        kind, message_id, length, crc = header
        parsed.recognised = True
        payload_start = position + records.header_size
        payload_end = payload_start + length
        if payload_end > end:
            break  # torn tail
        parsed.max_id = max(parsed.max_id, message_id)
        if zlib.crc32(data[payload_start:payload_end]) != crc or not _apply(
                kind, message_id, data, payload_start, payload_end, segment, messages):
            parsed.damaged = True
            problems.append(f"queue/seg/{segment.path.name}: damaged record at offset {position}, skipped")
            if records.key is None:  # an unauthenticated length may be the damage
                following = records.next_header(data, position + 1)
                if following == -1:
                    break
                position = following
                continue
        position = parsed.clean_end = payload_end
    return parsed


def _apply(kind: bytes, message_id: int, data, start: int, end: int, segment: Segment,
           messages: dict[int, QueuedMessage]) -> bool:
    """Apply one record; False when its payload makes no sense."""
    try:
        if kind == b"M":
            (envelope_length,) = ENVELOPE_LENGTH.unpack_from(data, start)
            envelope = json.loads(bytes(data[start + 4:start + 4 + envelope_length]))
            body_offset = start + 4 + envelope_length
            recipients = [Recipient(_address(entry)) for entry in envelope["rcpt"]]
            messages[message_id] = QueuedMessage(message_id, float(envelope["born"]), str(envelope["sender"]),
                                                 recipients, end - body_offset, segment, body_offset)
            segment.live.add(message_id)
            return True
        message = messages.get(message_id)
        if message is None:
            return kind in b"EDT"
        if kind == b"E":
            del messages[message_id]
            if message.segment is not None:
                message.segment.live.discard(message_id)
            return True
        fields = json.loads(bytes(data[start:end]))
        recipient = message.recipients[fields["i"]]
        if kind == b"D":
            recipient.state, recipient.text = str(fields["s"]), str(fields["t"])
        elif kind == b"T":
            recipient.next_try, recipient.text = float(fields["n"]), str(fields["t"])
        else:
            return False
        return True
    except (ValueError, KeyError, IndexError, TypeError, struct.error):
        return False


def _address(entry: str | list[str]) -> str:
    """A recipient of an M record; queues written before routing moved to the
    scheduler hold [address, channel] pairs."""
    return entry if isinstance(entry, str) else str(entry[0])


def scan(queue_dir: Path, repair: bool = False) -> ScanResult:
    """Read every segment.  With ``repair`` (the server at start, holding the
    lock) torn tails are cut off and unreadable files moved to corrupt/."""
    messages: dict[int, QueuedMessage] = {}
    segments: list[Segment] = []
    problems: list[str] = []
    max_id = 0
    key = queue_key(queue_dir)
    current = Records(key.key) if key is not None else LEGACY
    first_keyed = key.first_segment if key is not None else 0
    seg_dir = queue_dir / "seg"
    try:
        names = sorted(os.listdir(seg_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        path = seg_dir / name
        number = decimal(name)
        if number is None:
            if repair:
                move_aside(queue_dir, path, problems, "not a segment name")
            continue
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                data: bytes | mmap.mmap = (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                                           if size else b"")
        except FileNotFoundError:
            continue  # removed by the server while we looked
        try:
            segment = Segment(number, path, current if number >= first_keyed else LEGACY)
            parsed = _parse_segment(segment, data, messages, problems)
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
        if size and not parsed.recognised:
            why = "holds no record this queue can verify (is queue/key missing or replaced?)"
            if repair:
                move_aside(queue_dir, path, problems, why)
            else:
                problems.append(f"queue/seg/{name}: {why}")
            continue
        max_id = max(max_id, parsed.max_id, segment.number)
        if repair and parsed.damaged:
            corrupt = queue_dir / "corrupt"
            corrupt.mkdir(exist_ok=True)
            shutil.copyfile(path, corrupt / f"{name}.{int(time.time())}")
            problems.append(f"queue/seg/{name}: a copy is kept in queue/corrupt/ for inspection")
        if repair and parsed.clean_end < size:
            with open(path, "r+b") as handle:
                handle.truncate(parsed.clean_end)
                os.fsync(handle.fileno())
            problems.append(f"queue/seg/{name}: cut {size - parsed.clean_end} bytes of an unfinished write")
            size = parsed.clean_end
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
