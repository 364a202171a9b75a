"""Reading a queue's segments back from scratch, as recovery does, for tests
that check what is on disk."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qtwist.queue.index import INDEX_FILE, Index, recover
from qtwist.queue.records import QueuedMessage


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
