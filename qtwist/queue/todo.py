"""The pickup directory: messages ``qtwist sendmail`` leaves in queue/todo/
for the server to queue (qmail's todo/, which qmail-send preprocesses).

A todo/ file is ``QTWTODO1``, a line of envelope JSON (sender, recipients),
then the message bytes (LF line ends); it appears under its name only once it
is whole and fsynced, so any file found there is complete.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from qtwist.fsutil import fsync_directory, replace_file
from qtwist.queue.records import move_aside


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
    it is durable."""
    todo = home / "queue" / "todo"
    make_todo_dir(todo)
    envelope = json.dumps({"sender": sender, "rcpt": recipients}, separators=(",", ":")).encode()
    final = todo / f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
    # The scratch file's dot name keeps the server from taking it half written;
    # the mode lets the server's group read what any injecting user wrote.
    replace_file(final, TODO_MAGIC + envelope + b"\n" + body, TODO_FILE_MODE)
    return final


def parse_todo(data: bytes) -> tuple[str, list[str], bytes]:
    """(sender, recipients, message) of a todo/ file; ValueError if it is not one."""
    if not data.startswith(TODO_MAGIC):
        raise ValueError("not a qtwist sendmail file")
    line_end = data.find(b"\n", len(TODO_MAGIC))
    if line_end < 0:
        raise ValueError("no envelope line")
    try:
        envelope = json.loads(data[len(TODO_MAGIC):line_end])
    except RecursionError:
        raise ValueError("the envelope nests too deep") from None
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
                move_aside(queue_dir, path, batch.problems, f"cannot be queued ({why})")
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
        fsync_directory(queue_dir / "todo")
