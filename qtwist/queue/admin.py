"""What the ``qtwist`` command asks of a queue (qmail-qstat, qmail-qread, and
removing or retrying messages), and the server's side of those requests.

The running server owns the queue (it holds queue/lock), so the command
never writes to it then: it leaves a request in queue/rm/ or touches
queue/flush, and the server acts on it within a second.  With no server
running, ``queue rm`` appends the end records itself, under the lock.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qtwist.fsutil import replace_file
from qtwist.numbers import decimal
from qtwist.queue.index import INDEX_FILE, Index, Snapshot, open_index, recover
from qtwist.queue.records import QueuedMessage, QueueError, Segment
from qtwist.queue.store import take_lock


@contextmanager
def reading(queue_dir: Path) -> Iterator[Snapshot | None]:
    """What the queue holds now; None when there is no queue yet.  While a
    server runs, its index is only read (with what the server wrote beyond
    it); otherwise this takes the lock and first brings the index up to date
    (recovery, as at the server's start)."""
    if not (queue_dir / "seg").is_dir():
        yield None
        return
    lock = take_lock(queue_dir)
    try:
        if lock is None:
            index = Index(queue_dir / INDEX_FILE, readonly=True)
        else:
            index = open_index(queue_dir)
            recover(queue_dir, index)
        try:
            snapshot = Snapshot(queue_dir, index)
            try:
                yield snapshot
            finally:
                snapshot.close()
        finally:
            index.close()
    finally:
        if lock is not None:
            os.close(lock)


def queue_stat(home: Path) -> tuple[int, int]:
    """(messages in queue, not yet preprocessed).  A message accepted by SMTP
    is preprocessed at once, so the second number counts what ``qtwist
    sendmail`` left in todo/ and the server has not taken yet."""
    with reading(home / "queue") as index:
        total = index.count() if index is not None else 0
    try:
        waiting = sum(1 for name in os.listdir(home / "queue" / "todo") if not name.startswith("."))
    except FileNotFoundError:
        waiting = 0
    return total, waiting


def queue_read(home: Path) -> Iterator[QueuedMessage]:
    """Every message in the queue, oldest first, read as it goes."""
    with reading(home / "queue") as index:
        if index is not None:
            yield from index.messages()


def _matching(home: Path, ids: list[str], match: str | None) -> list[int]:
    """The ids of the messages asked for, looked up in a pass over the queue."""
    wanted: dict[int, str] = {}
    for text in ids:
        number = decimal(text)
        if number is None:
            raise QueueError(f"no message {text} in the queue")
        wanted[number] = text
    needle = match.lower() if match else None
    chosen = []
    for message in queue_read(home):
        addresses = [message.sender] + [r.address for r in message.recipients]
        if wanted.pop(message.id, None) is not None or (
                needle and any(needle in address.lower() for address in addresses)):
            chosen.append(message.id)
    if wanted:
        raise QueueError(f"no message {next(iter(wanted.values()))} in the queue")
    return chosen


def queue_remove(home: Path, ids: list[str], match: str | None, wait: float = 30.0) -> int:
    """Remove messages by id or by a substring of their envelope addresses.

    With the server running, the server does it (it owns the queue): a request
    file goes to queue/rm/ and this waits until the server has taken it.
    """
    queue_dir = home / "queue"
    chosen = _matching(home, ids, match)
    if not chosen:
        return 0
    lock = take_lock(queue_dir)
    if lock is None:
        _request_removal(queue_dir, chosen, wait)
        return len(chosen)
    try:
        # No server: append the E records ourselves, under the lock, and tell the index.
        index = open_index(queue_dir)
        try:
            recovery = recover(queue_dir, index)
            by_segment: dict[Segment, list[int]] = {}
            for message_id, number, _ in index.locate(chosen):  # no server: none is held
                segment = recovery.segments.get(number)
                if segment is not None:
                    by_segment.setdefault(segment, []).append(message_id)
            for segment, removed in by_segment.items():
                fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, b"".join(segment.records.end(message_id, "removed") for message_id in removed))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            # The records are durable: the next reader applies them even if this does not.
            recover(queue_dir, index)
        finally:
            index.close()
    finally:
        os.close(lock)
    return len(chosen)


def _request_removal(queue_dir: Path, ids: list[int], wait: float) -> None:
    rm_dir = queue_dir / "rm"
    rm_dir.mkdir(exist_ok=True)
    name = f"{time.time_ns()}.{os.getpid()}"
    # Whole or absent, never half: the server reads what it finds.
    replace_file(rm_dir / name, (" ".join(map(str, ids)) + "\n").encode(), durable=False)
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
            number = decimal(word)
            if number is not None:
                yield number
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
