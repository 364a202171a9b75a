"""The queue's record format, and reading segments back.

Each record: ``QTW2`` kind(1) id(u64) length(u32) crc32(u32) mac(16), then the
payload.  The MAC (keyed BLAKE2b over kind, id, length and crc, with the key
in queue/key) makes a header only the server can write: after damage, recovery
looks for the next header it can verify, so a record quoted inside a message
body (a mailed segment, or a forged one) is never taken for a real one.
Queues written before keep their ``QTW1`` segments (the same header without
MAC); they are read, and appended to, in their own format.

Kinds: ``M`` message (u32 envelope length, envelope JSON, message bytes with
LF line ends), ``D`` one recipient resolved, ``T`` a deferral (next try),
``E`` the message ended (delivered, bounced or removed).

``parse_segment`` reads records back, from any record boundary on, into a
``Sink``: the index at recovery (queue.index), or a running server's queue
as ``qtwist qstat``/``qread`` see it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

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
    thread; which messages still live in it, to the index."""

    number: int
    path: Path
    records: Records
    size: int = 0
    fd: int | None = None
    sealed: bool = False
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
        # Keyed once: each header's MAC starts from a copy.
        self._keyed = hashlib.blake2b(key=key, digest_size=MAC_SIZE) if key is not None else None

    def _mac(self, fields: bytes) -> bytes:
        if self._keyed is None:
            return b""
        mac = self._keyed.copy()
        mac.update(fields)
        return mac.digest()

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


class Sink(Protocol):
    """Where the records read back from a segment go (the index)."""

    def message(self, message_id: int, born: float, sender: str, addresses: list[str], segment: int,
                offset: int, size: int) -> None: ...

    def result(self, message_id: int, index: int, state: str, text: str) -> None:
        """Raises IndexError for a recipient the message does not have."""

    def deferral(self, message_id: int, index: int, next_try: float, text: str) -> None:
        """Raises IndexError for a recipient the message does not have."""

    def end(self, message_id: int) -> None: ...


@dataclass
class Parsed:
    max_id: int = 0
    clean_end: int = 0  # the length of the prefix that ends with a whole record
    damaged: bool = False  # a bad record was met before the end
    recognised: bool = False  # at least one header verified


def parse_segment(segment: Segment, data: bytes | mmap.mmap, start: int, sink: Sink,
                  problems: list[str]) -> Parsed:
    """Hand the records of one segment, from offset ``start`` on, to ``sink``.

    A header that does not verify is skipped to the next one that does; a
    record whose payload fails its CRC is skipped by its (verified) length.
    A header or payload cut short at the very end is a torn write that never
    got its 250.
    """
    records, parsed = segment.records, Parsed(clean_end=start)
    position, end = start, len(data)
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
                kind, message_id, data, payload_start, payload_end, segment, sink):
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


def _apply(kind: bytes, message_id: int, data, start: int, end: int, segment: Segment, sink: Sink) -> bool:
    """Hand one record to the sink; False when its payload makes no sense."""
    try:
        if kind == b"M":
            (envelope_length,) = ENVELOPE_LENGTH.unpack_from(data, start)
            envelope = json.loads(bytes(data[start + 4:start + 4 + envelope_length]))
            body_offset = start + 4 + envelope_length
            if body_offset > end:
                return False
            sink.message(message_id, float(envelope["born"]), str(envelope["sender"]),
                         [_address(entry) for entry in envelope["rcpt"]], segment.number, body_offset,
                         end - body_offset)
        elif kind == b"E":
            sink.end(message_id)
        elif kind in b"DT":
            fields = json.loads(bytes(data[start:end]))
            index = fields["i"]
            if not isinstance(index, int) or index < 0:
                return False
            if kind == b"D":
                sink.result(message_id, index, str(fields["s"]), str(fields["t"]))
            else:
                sink.deferral(message_id, index, float(fields["n"]), str(fields["t"]))
        else:
            return False
        return True
    except (ValueError, KeyError, IndexError, TypeError, struct.error):
        return False


def _address(entry: str | list[str]) -> str:
    """A recipient of an M record; queues written before routing moved to the
    scheduler hold [address, channel] pairs."""
    return entry if isinstance(entry, str) else str(entry[0])


def move_aside(queue_dir: Path, path: Path, problems: list[str], why: str) -> None:
    corrupt = queue_dir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    target = corrupt / f"{path.name}.{int(time.time())}"
    os.replace(path, target)
    problems.append(f"queue/{path.parent.name}/{path.name}: {why}; moved to queue/corrupt/{target.name}")


def keep_copy(queue_dir: Path, path: Path, problems: list[str]) -> None:
    corrupt = queue_dir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    shutil.copyfile(path, corrupt / f"{path.name}.{int(time.time())}")
    problems.append(f"queue/seg/{path.name}: a copy is kept in queue/corrupt/ for inspection")
