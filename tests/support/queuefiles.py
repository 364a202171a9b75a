"""Queues on disk for tests and benchmarks: reading a queue's segments back
from scratch, as recovery does, and building a big one offline."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qtwist.queue.index import INDEX_FILE, Index, open_index, recover
from qtwist.queue.records import (PENDING, SEGMENT_LIMIT, QueuedMessage, Recipient, Records, Segment,
                                  queue_key)
from qtwist.send import next_retry


@dataclass
class ReadBack:
    messages: dict[int, QueuedMessage]
    problems: list[str]


def forget_index(queue_dir: Path) -> None:
    """Remove the index, so the next start reads every segment from its start."""
    for suffix in ("", "-wal", "-shm"):
        (queue_dir / (INDEX_FILE + suffix)).unlink(missing_ok=True)


def read_back(queue_dir: Path) -> ReadBack:
    """What a fresh index makes of a copy of the segments (the queue itself,
    which a server may hold, is left alone)."""
    with tempfile.TemporaryDirectory(prefix="qtwist-readback-") as scratch:
        copy = Path(scratch)
        shutil.copytree(queue_dir / "seg", copy / "seg")
        if (queue_dir / "key").exists():
            shutil.copyfile(queue_dir / "key", copy / "key")
        index = Index(":memory:")
        try:
            recovery = recover(copy, index)
            messages = {message.id: message for message in index.messages(recovery.segments)}
        finally:
            index.close()
        # Bodies are read while the copy exists.
        for message in messages.values():
            message.body = message.read_body()
            message.segment.close()
        return ReadBack(messages, recovery.problems)


NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"


def build_queue(queue_dir: Path, count: int, domain: str, *, body: bytes = b"Subject: queued\n\n" + b"x" * 1000,
                now: float | None = None, recipient: Callable[[int], str] = lambda n: f"user{n}",
                ended: Callable[[int], bool] = lambda n: False, with_index: bool = True) -> list[int]:
    """A queue of ``count`` messages to ``domain``, each deferred once, as a
    server would have left it (its records, and its index unless
    ``with_index`` is false), built offline in moments.  They were born over
    the last two days, so their retries are spread over the next half hour;
    those ``ended`` picks have their end record too.  Returns the live ids."""
    now = time.time() if now is None else now
    (queue_dir / "seg").mkdir(parents=True)
    records = Records(queue_key(queue_dir, create=True).key)
    index = open_index(queue_dir) if with_index else None
    if index is not None:
        index.matches(records.key)
        index.db.execute("BEGIN")
    rng = random.Random(count)
    first_id = int((now - 3 * 86400) * 1000)
    segment, handle, live = None, None, []

    def finish_segment() -> None:
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        if index is not None:
            index.applied(segment.number, segment.size)

    for number in range(count):
        message_id = first_id + number
        if segment is None or segment.size >= SEGMENT_LIMIT:
            if segment is not None:
                finish_segment()
            segment = Segment(message_id, queue_dir / "seg" / f"{message_id:012d}", records, sealed=True)
            handle = open(segment.path, "wb")
        born = now - 2 * 86400 * (count - number) / count - 60
        pending = Recipient(f"{recipient(number)}@{domain}", PENDING, NO_CONNECTION,
                            next_retry(born, now - rng.uniform(0, 1800), "remote"))
        message = QueuedMessage(message_id, born, f"sender{number % 1000}@source.test", [pending], len(body),
                                segment)
        data, body_offset = records.message(message_id, born, message.sender, [pending], body)
        message.offset = segment.size + body_offset
        data += records.deferral(message_id, 0, pending.next_try, pending.text)
        if ended(number):
            data += records.end(message_id, "done")
        else:
            live.append(message_id)
            if index is not None:
                index.add(message, held=False)
        handle.write(data)
        segment.size += len(data)
    if segment is not None:
        finish_segment()
    if index is not None:
        index.db.execute("COMMIT")
        index.close()
    return live
