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
from pathlib import Path
from typing import Iterator

from qtwist.fsutil import replace_file
from qtwist.numbers import decimal
from qtwist.queue.records import QueuedMessage, QueueError, Segment, scan
from qtwist.queue.store import take_lock


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
        number = decimal(text)
        if number is None or number not in messages:
            raise QueueError(f"no message {text} in the queue")
        chosen[number] = messages[number]
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
    lock = take_lock(queue_dir) if queue_dir.is_dir() else None
    if lock is None:
        _request_removal(queue_dir, [m.id for m in chosen], wait)
        return len(chosen)
    try:
        # No server: append the E records ourselves, under the lock.
        by_segment: dict[Segment, list[bytes]] = {}
        for message in chosen:
            by_segment.setdefault(message.segment, []).append(message.segment.records.end(message.id, "removed"))
        for segment, records in by_segment.items():
            fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
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
