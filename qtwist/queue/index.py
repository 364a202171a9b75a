"""The queue's index: for every message not ended, where it lies and when
it is next due, in SQLite (WAL) beside the segments.

The segments stay the truth: a message is durable in its segment before its
250, and the index is brought up to date after each write.  The index
remembers, per segment, how many bytes of it it has applied; at start only
what lies beyond that is read again (what the last moments before a crash
wrote), so starting takes the same time whatever the size of the queue.
A queue without an index (one written by an older server, or whose index
was removed) has its segments read from the start, once.

Two tables: ``message`` (the envelope and each recipient's state, a row per
message) and ``schedule`` (a narrow row per message: when it is next due,
the one domain its pending recipients share, and whether the server holds
it in memory), so that putting off every message of a dead destination
rewrites small rows only.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

from qtwist.numbers import decimal
from qtwist.queue.records import (FAILED, LEGACY, PENDING, QueuedMessage, Recipient, Records, Segment, keep_copy,
                                  move_aside, parse_segment, queue_key)

INDEX_FILE = "index.sqlite"
# Due times of messages an admin flushed are moved this far into the past:
# they sort before every other due message, in their own order.
FLUSHED = 1e12
# Rows a piece of bulk work touches at once, so the writer thread goes back
# to its records (and the sessions waiting on them) in between.
CHUNK = 2000
# Free pages given back at once (4 KiB each), for the same reason.
GIVE_BACK = 4000
# The write-ahead log is cut back to this many bytes once it is checkpointed.
WAL_LIMIT = 16 * 2**20

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY, segment INTEGER NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL,
    born REAL NOT NULL, sender TEXT NOT NULL, recipients TEXT NOT NULL);  -- sender and recipients in JSON
CREATE INDEX IF NOT EXISTS message_segment ON message (segment);
CREATE TABLE IF NOT EXISTS schedule (
    id INTEGER PRIMARY KEY, due REAL NOT NULL, domain TEXT NOT NULL, born REAL NOT NULL,
    held INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS schedule_due ON schedule (held, due);
CREATE INDEX IF NOT EXISTS schedule_domain ON schedule (domain, due);
CREATE TABLE IF NOT EXISTS segment (number INTEGER PRIMARY KEY, applied INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS about (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def sql_text(text: str) -> str:
    """Text SQLite can store: bytes a client sent that are not UTF-8 (kept
    as surrogates) become backslash escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def encode_recipients(recipients: list[Recipient]) -> str:
    return json.dumps([[r.address, r.state, r.text, r.next_try] for r in recipients], separators=(",", ":"))


def decode_recipients(text: str) -> list[Recipient]:
    return [Recipient(str(a), str(s), str(t), float(n)) for a, s, t, n in json.loads(text)]


@dataclass(frozen=True, slots=True)
class State:
    """What the index keeps of a message's recipients: the recipients, when
    it is next due (0 when it only waits for its bounce or its end), and the
    one domain of its pending recipients ('' for several)."""

    recipients: str
    due: float
    domain: str

    @classmethod
    def of(cls, recipients: list[Recipient]) -> State:
        pending = [r for r in recipients if r.state == PENDING]
        if not pending or any(r.state == FAILED for r in recipients):
            due = 0.0
        else:
            due = min(r.next_try for r in pending)
        domains = {sql_text(r.address.rpartition("@")[2].lower()) for r in pending}
        return cls(encode_recipients(recipients), due, domains.pop() if len(domains) == 1 else "")


class Index:
    """One connection to the index (SQLite connections stay in their thread)."""

    def __init__(self, path: Path | str, readonly: bool = False):
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                      check_same_thread=False)
        else:
            if path != ":memory:":
                # Envelopes are private, like the segments: SQLite gives its -wal and -shm the same mode.
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Rows of ended messages leave free pages, given back by give_back (for a new index only).
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self.db.execute("PRAGMA journal_mode=WAL")
            # Nor does the log keep the size a big change once gave it.
            self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            # A crash loses no more than the last commits, which recovery reads again from the segments.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA busy_timeout=10000")

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> sqlite3.Connection:
        """``with index.transaction():`` one commit for what the block does."""
        self.db.execute("BEGIN")
        return _Commit(self.db)

    # -- what the writer applies -------------------------------------------------

    def add(self, message: QueuedMessage, held: bool) -> None:
        state = State.of(message.recipients)
        self.db.execute("INSERT OR REPLACE INTO message VALUES (?,?,?,?,?,?,?)",
                        (message.id, message.segment.number, message.offset, message.size, message.born,
                         json.dumps(message.sender), state.recipients))
        self.db.execute("INSERT OR REPLACE INTO schedule VALUES (?,?,?,?,?)",
                        (message.id, state.due, state.domain, message.born, int(held)))

    def update(self, message_id: int, state: State, held: bool | None = None) -> None:
        self.db.execute("UPDATE message SET recipients = ? WHERE id = ?", (state.recipients, message_id))
        if held is None:
            self.db.execute("UPDATE schedule SET due = ?, domain = ? WHERE id = ?",
                            (state.due, state.domain, message_id))
        else:
            self.db.execute("UPDATE schedule SET due = ?, domain = ?, held = ? WHERE id = ?",
                            (state.due, state.domain, int(held), message_id))

    def remove(self, message_id: int) -> None:
        self.db.execute("DELETE FROM message WHERE id = ?", (message_id,))
        self.db.execute("DELETE FROM schedule WHERE id = ?", (message_id,))

    def applied(self, number: int, size: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO segment VALUES (?,?)", (number, size))

    def give_back(self, pages: int) -> bool:
        """Up to ``pages`` of the index's free pages go back to the file
        system; whether some are left to give (never, for an index made
        before it could: its pages stay free for new rows)."""
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        if not free:
            return False
        self.db.execute(f"PRAGMA incremental_vacuum({min(free, pages)})").fetchall()
        return 0 < self.db.execute("PRAGMA freelist_count").fetchone()[0] < free

    def segment_empty(self, number: int) -> bool:
        return self.db.execute("SELECT 1 FROM message WHERE segment = ? LIMIT 1", (number,)).fetchone() is None

    def drop_segment(self, number: int) -> int:
        """Forget a segment and the messages in it; how many there were."""
        dropped = self.db.execute("DELETE FROM schedule WHERE id IN (SELECT id FROM message WHERE segment = ?)",
                                  (number,)).rowcount
        self.db.execute("DELETE FROM message WHERE segment = ?", (number,))
        self.db.execute("DELETE FROM segment WHERE number = ?", (number,))
        return dropped

    def matches(self, key: bytes | None) -> None:
        """An index made under another queue key (a replaced or removed key)
        says nothing about these segments: it is emptied, to be rebuilt."""
        fingerprint = hashlib.blake2b(key, digest_size=16).hexdigest() if key is not None else "none"
        row = self.db.execute("SELECT value FROM about WHERE name = 'key'").fetchone()
        if row is None or row[0] != fingerprint:
            with self.transaction():
                for table in ("message", "schedule", "segment"):
                    self.db.execute(f"DELETE FROM {table}")
                self.db.execute("INSERT OR REPLACE INTO about VALUES ('key', ?)", (fingerprint,))

    def segments_applied(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT number, applied FROM segment"))

    # -- what the scheduler asks ---------------------------------------------------

    def take_due(self, limit: int, segments: dict[int, Segment], skip: Collection[int] = ()) -> list[QueuedMessage]:
        """The ``limit`` messages due soonest that the server does not hold,
        and that lie in no segment of ``skip``, now marked held.  A pending
        recipient is due no earlier than its message (a dead destination put
        it off), or at once when flushed."""
        rows = self.db.execute(
            "SELECT m.id, m.segment, m.offset, m.size, m.born, m.sender, m.recipients, s.due "
            "FROM schedule s JOIN message m ON m.id = s.id WHERE s.held = 0 "
            f"AND m.segment NOT IN ({','.join('?' * len(skip))}) ORDER BY s.due LIMIT ?",
            (*skip, limit)).fetchall()
        if not rows:
            return []
        with self.transaction():
            self.db.executemany("UPDATE schedule SET held = 1 WHERE id = ?", [(row[0],) for row in rows])
        messages = []
        for message_id, number, offset, size, born, sender, recipients, due in rows:
            message = QueuedMessage(message_id, born, json.loads(sender), decode_recipients(recipients), size,
                                    segments.get(number), offset)
            for recipient in message.recipients:
                if recipient.state == PENDING:
                    recipient.next_try = 0.0 if due < 0 else max(recipient.next_try, due)
            messages.append(message)
        return messages

    def next_due(self) -> float | None:
        """When the first message the server does not hold is due; None if there is none."""
        row = self.db.execute("SELECT due FROM schedule WHERE held = 0 ORDER BY due LIMIT 1").fetchone()
        return None if row is None else row[0]

    def release_all(self) -> None:
        """No server holds any message (at recovery)."""
        with self.transaction():
            self.db.execute("UPDATE schedule SET held = 0 WHERE held = 1")

    def put_off(self, domain: str, until: float, lifetime: float) -> int:
        """Up to CHUNK messages for ``domain`` not held and due before ``until``
        (or their end of life, if sooner) are due then instead; how many."""
        with self.transaction():
            return self.db.execute(
                "UPDATE schedule SET due = min(?, born + ?) WHERE id IN (SELECT id FROM schedule "
                "WHERE domain = ? AND held = 0 AND due >= 0 AND due < min(?, born + ?) LIMIT ?)",
                (until, lifetime, sql_text(domain.lower()), until, lifetime, CHUNK)).rowcount

    def flush(self) -> int:
        """Up to CHUNK messages not held are due at once, in their order; how many."""
        with self.transaction():
            return self.db.execute(
                "UPDATE schedule SET due = due - ? WHERE id IN (SELECT id FROM schedule "
                "WHERE held = 0 AND due >= 0 LIMIT ?)", (FLUSHED, CHUNK)).rowcount

    def locate(self, ids: list[int]) -> list[tuple[int, int, bool]]:
        """(id, segment, whether the server holds it) of those of ``ids`` in the queue."""
        return [(message_id, number, bool(held)) for message_id, number, held in self._for_ids(
            "SELECT m.id, m.segment, s.held FROM message m JOIN schedule s ON s.id = m.id WHERE m.id IN", ids)]

    def _for_ids(self, query: str, ids) -> list[tuple]:
        """The rows of ``query`` (which ends in ``IN``) for ``ids``, 500 at a time."""
        ids, rows = list(ids), []
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            rows += self.db.execute(f"{query} ({','.join('?' * len(part))})", part).fetchall()
        return rows

    # -- compaction ------------------------------------------------------------------

    def live_in(self, number: int) -> int:
        """Bytes of the messages still in segment ``number``."""
        return self.db.execute("SELECT coalesce(sum(size), 0) FROM message WHERE segment = ?",
                               (number,)).fetchone()[0]

    def movable(self, number: int, limit: int) -> list[tuple[int, int, int, float, str, str]]:
        """(id, offset, size, born, sender, recipients) of up to ``limit``
        messages in segment ``number`` that the server does not hold."""
        return self.db.execute("SELECT m.id, m.offset, m.size, m.born, m.sender, m.recipients FROM message m "
                               "JOIN schedule s ON s.id = m.id WHERE m.segment = ? AND s.held = 0 LIMIT ?",
                               (number, limit)).fetchall()

    def held_in(self, number: int) -> list[int]:
        """The messages in segment ``number`` that the server holds."""
        return [row[0] for row in self.db.execute(
            "SELECT m.id FROM message m JOIN schedule s ON s.id = m.id WHERE m.segment = ? AND s.held = 1",
            (number,))]

    def moved(self, message_id: int, number: int, offset: int) -> None:
        self.db.execute("UPDATE message SET segment = ?, offset = ? WHERE id = ?", (number, offset, message_id))

    # -- what the qtwist command reads ---------------------------------------------

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM message").fetchone()[0]

    def present(self, ids) -> set[int]:
        """Those of ``ids`` the index holds."""
        return {row[0] for row in self._for_ids("SELECT id FROM message WHERE id IN", ids)}

    def messages(self, segments: dict[int, Segment] | None = None) -> Iterator[QueuedMessage]:
        """Every message, oldest first (ids grow with time), read as it goes
        (with its segment when ``segments`` are given, to read its body)."""
        for message_id, number, offset, size, born, sender, recipients in self.db.execute(
                "SELECT id, segment, offset, size, born, sender, recipients FROM message ORDER BY id"):
            yield QueuedMessage(message_id, born, json.loads(sender), decode_recipients(recipients), size,
                                segments.get(number) if segments else None, offset)


class _Commit:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, kind, error, trace) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


class _Replay:
    """A records.Sink that applies what a segment says to the index."""

    def __init__(self, index: Index, segments: dict[int, Segment]):
        self.index = index
        self.segments = segments

    def message(self, message_id: int, born: float, sender: str, addresses: list[str], segment: int,
                offset: int, size: int) -> None:
        message = QueuedMessage(message_id, born, sender, [Recipient(a) for a in addresses], size,
                                self.segments[segment], offset)
        self.index.add(message, held=False)

    def _recipients(self, message_id: int) -> list[Recipient] | None:
        row = self.index.db.execute("SELECT recipients FROM message WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else decode_recipients(row[0])

    def result(self, message_id: int, index: int, state: str, text: str) -> None:
        recipients = self._recipients(message_id)
        if recipients is not None:
            recipients[index].state, recipients[index].text = state, text
            self.index.update(message_id, State.of(recipients))

    def deferral(self, message_id: int, index: int, next_try: float, text: str) -> None:
        recipients = self._recipients(message_id)
        if recipients is not None:
            recipients[index].next_try, recipients[index].text = next_try, text
            self.index.update(message_id, State.of(recipients))

    def end(self, message_id: int) -> None:
        self.index.remove(message_id)


class _Tail:
    """A records.Sink for what a running server wrote beyond what its index
    applied: new messages, and changes to or ends of indexed ones."""

    def __init__(self, segments: dict[int, Segment]):
        self.segments = segments
        self.added: dict[int, QueuedMessage] = {}
        self.changes: dict[int, list[tuple[int, str | None, str, float | None]]] = {}
        self.ended: set[int] = set()

    def message(self, message_id: int, born: float, sender: str, addresses: list[str], segment: int,
                offset: int, size: int) -> None:
        self.added[message_id] = QueuedMessage(message_id, born, sender, [Recipient(a) for a in addresses], size,
                                               self.segments[segment], offset)

    def result(self, message_id: int, index: int, state: str, text: str) -> None:
        message = self.added.get(message_id)
        if message is None:
            self.changes.setdefault(message_id, []).append((index, state, text, None))
        else:
            message.recipients[index].state, message.recipients[index].text = state, text

    def deferral(self, message_id: int, index: int, next_try: float, text: str) -> None:
        message = self.added.get(message_id)
        if message is None:
            self.changes.setdefault(message_id, []).append((index, None, text, next_try))
        else:
            message.recipients[index].next_try, message.recipients[index].text = next_try, text

    def end(self, message_id: int) -> None:
        if self.added.pop(message_id, None) is None:
            self.ended.add(message_id)


class Snapshot:
    """What a queue holds, read without its lock while a server may write:
    the index, in one read transaction, and what the segments hold beyond
    what it applied (the messages the server has not indexed yet)."""

    def __init__(self, queue_dir: Path, index: Index):
        self.index = index
        index.db.execute("BEGIN")
        applied = index.segments_applied()
        segments: dict[int, Segment] = {}
        self.tail = _Tail(segments)
        for _, segment in segment_files(queue_dir):
            if segment is None:
                continue
            segments[segment.number] = segment
            start = applied.get(segment.number, 0)
            try:
                with open(segment.path, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size <= start:
                        continue
                    data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                continue  # removed by the server while we looked
            try:
                parse_segment(segment, data, start, self.tail, [])
            finally:
                data.close()

    def close(self) -> None:
        self.index.db.execute("COMMIT")

    def count(self) -> int:
        tail = self.tail
        indexed = self.index.present(list(tail.added) + list(tail.ended))
        return (self.index.count() + sum(1 for i in tail.added if i not in indexed)
                - sum(1 for i in tail.ended if i in indexed))

    def messages(self) -> Iterator[QueuedMessage]:
        """Every message, oldest first, as it is now."""
        tail = self.tail
        for message in self.index.messages():
            if message.id in tail.ended or message.id in tail.added:
                continue
            for index, state, text, next_try in tail.changes.get(message.id, ()):
                if index < len(message.recipients):
                    recipient = message.recipients[index]
                    recipient.text = text
                    if state is not None:
                        recipient.state = state
                    if next_try is not None:
                        recipient.next_try = next_try
            yield message
        yield from sorted(tail.added.values(), key=lambda message: message.id)


def segment_files(queue_dir: Path) -> Iterator[tuple[Path, Segment | None]]:
    """Each file in seg/, in order, as a Segment read in the record format it
    was written in (None for a name that is no segment number)."""
    key = queue_key(queue_dir)
    current = Records(key.key) if key is not None else LEGACY
    first_keyed = key.first_segment if key is not None else 0
    try:
        names = sorted(os.listdir(queue_dir / "seg"))
    except FileNotFoundError:
        return
    for name in names:
        path = queue_dir / "seg" / name
        number = decimal(name)
        yield path, (None if number is None
                     else Segment(number, path, current if number >= first_keyed else LEGACY, sealed=True))


@dataclass
class Recovery:
    segments: dict[int, Segment] = field(default_factory=dict)
    max_id: int = 0
    problems: list[str] = field(default_factory=list)


def recover(queue_dir: Path, index: Index) -> Recovery:
    """Bring the index up to date with the segments: read what each holds
    beyond what the index applied.  The caller holds the queue's lock: torn
    tails are cut off, damaged files copied to corrupt/, unreadable ones
    moved there, and segments with no message left removed."""
    result = Recovery()
    key = queue_key(queue_dir)
    index.matches(key.key if key is not None else None)
    applied = index.segments_applied()
    replay = _Replay(index, result.segments)
    for path, segment in segment_files(queue_dir):
        if segment is None:
            move_aside(queue_dir, path, result.problems, "not a segment name")
            continue
        number, name = segment.number, path.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue  # removed by the server while we looked
        start = applied.get(number, 0)
        if start > size:
            result.problems.append(f"queue/seg/{name}: shorter than the index knew; read again from the start")
            start = 0
        result.segments[number] = segment
        if start < size:
            size = _read_segment(queue_dir, segment, start, size, index, replay, result)
            if size is None:
                del result.segments[number]
                continue
        result.max_id = max(result.max_id, number)
        segment.size = size
    with index.transaction():
        for number in set(applied) - set(result.segments):
            lost = index.drop_segment(number)
            if lost:
                result.problems.append(f"queue/seg/{number:012d} is gone: {lost} messages in it are lost")
        for number, segment in list(result.segments.items()):
            if index.segment_empty(number):
                os.unlink(segment.path)
                index.drop_segment(number)
                del result.segments[number]
    index.release_all()  # the caller holds the lock: no server holds a message
    row = index.db.execute("SELECT max(id) FROM message").fetchone()
    result.max_id = max(result.max_id, row[0] or 0)
    return result


def _read_segment(queue_dir: Path, segment: Segment, start: int, size: int, index: Index, replay: _Replay,
                  result: Recovery) -> int | None:
    """Apply one segment from ``start``; its size after repair, or None when
    it was unreadable (and moved aside)."""
    with open(segment.path, "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        with index.transaction():
            parsed = parse_segment(segment, data, start, replay, result.problems)
            if start == 0 and not parsed.recognised:
                move_aside(queue_dir, segment.path, result.problems,
                           "holds no record this queue can verify (is queue/key missing or replaced?)")
                return None
            index.applied(segment.number, parsed.clean_end)
    finally:
        data.close()
    result.max_id = max(result.max_id, parsed.max_id)
    if parsed.damaged:
        keep_copy(queue_dir, segment.path, result.problems)
    if parsed.clean_end < size:
        with open(segment.path, "r+b") as handle:
            handle.truncate(parsed.clean_end)
            os.fsync(handle.fileno())
        result.problems.append(f"queue/seg/{segment.path.name}: cut {size - parsed.clean_end} bytes "
                               f"of an unfinished write")
        return parsed.clean_end
    return size


def open_index(queue_dir: Path) -> Index:
    return Index(queue_dir / INDEX_FILE)
