"""Maildir as qmail-local writes it and POP3 reads it, with Maildir++ quotas.

Everything that knows a Maildir's rules lives here: unique names (with the
``,S=size`` Maildir++ readers use to count a quota without a stat), the
``:2,FLAGS`` info, the tmp/ → new/ delivery with its fsyncs, the move of new
mail into cur/ by a reader, and ``maildirsize``.  local.py delivers with it,
pop3d.py reads with it.  Every function blocks on the disk: delivery threads
and worker threads call them, never the reactor.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from pathlib import Path

from qtwist.fsutil import fsync_directory, replace_file, write_all

# Maildir++: a maildirsize file larger than this is rebuilt from the folder.
MAILDIRSIZE_MAX = 5120
# Maildir++: an over-quota verdict from a maildirsize older than this is checked
# against the folder again (a reader may have removed mail without noting it).
MAILDIRSIZE_STALE = 15 * 60
INFO = ":2,"  # the info a name gets in cur/ (no flags yet)
SEEN = "S"

_SIZE_IN_NAME = re.compile(r",S=([0-9]{1,18})")
# Unique names need the host name without '/' and ':' (the Maildir spec's escapes).
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
# next() on a count is atomic under the GIL: unique per process across threads.
_sequence = itertools.count(1)


# -- names ---------------------------------------------------------------------------------------

def unique_name(size: int) -> str:
    """A new message's name: time, microseconds, pid and a per-process count
    (unique even across nodes that share the mail store, by the host name),
    and the size for Maildir++ quotas."""
    now = time.time()
    seconds = int(now)
    return (f"{seconds}.M{int((now - seconds) * 1_000_000)}P{os.getpid()}Q{next(_sequence)}"
            f".{_HOST},S={size}")


def unique_part(name: str) -> str:
    """The part of a name that never changes: what comes before the info."""
    return name.split(":", 1)[0]


def size_in_name(name: str) -> int | None:
    """The ``,S=`` size a Maildir++ writer put in the name, if any."""
    match = _SIZE_IN_NAME.search(unique_part(name))
    return int(match.group(1)) if match else None


def with_flag(name: str, flag: str) -> str:
    """The name with ``flag`` set, flags kept in ASCII order as the spec asks."""
    unique, colon, info = name.partition(":")
    if not colon:
        return f"{unique}{INFO}{flag}"
    if not info.startswith("2,") or flag in info[2:]:
        return name  # already set, or an info field we do not understand
    return f"{unique}:2,{''.join(sorted(info[2:] + flag))}"


# -- delivering ----------------------------------------------------------------------------------

def deliver(maildir: Path, data: bytes, create: bool) -> str:
    """tmp/NAME, fsync, rename to new/NAME, fsync new/: once this returns, the
    message survives a crash.  ``create`` makes missing Maildir folders (a
    user's own Maildir, as vdelivermail does).  Returns NAME; raises OSError,
    leaving nothing in tmp/."""
    name = unique_name(len(data))
    tmp_path = f"{maildir}/tmp/{name}"
    new_dir = f"{maildir}/new"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp_path, flags, 0o600)
        except FileNotFoundError:
            if not create:
                raise
            for sub in ("tmp", "new", "cur"):
                os.makedirs(f"{maildir}/{sub}", mode=0o700, exist_ok=True)
            fd = os.open(tmp_path, flags, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, f"{new_dir}/{name}")
    except OSError:
        _unlink_quietly(tmp_path)
        raise
    _new_syncs.sync(new_dir)
    return name


class _DirectorySync:
    __slots__ = ("requested", "synced", "syncing", "waiting")

    def __init__(self) -> None:
        self.requested = self.synced = self.waiting = 0
        self.syncing = False


class DirectorySyncs:
    """Directory fsyncs shared between delivery threads: one fsync of new/
    makes durable every rename into it that happened before it started, so
    deliveries arriving together into one Maildir wait for one fsync, not one
    each (group commit)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._directories: dict[str, _DirectorySync] = {}

    def sync(self, directory: str) -> None:
        """Return once a rename into ``directory`` done before this call is durable."""
        with self._changed:
            state = self._directories.get(directory)
            if state is None:
                state = self._directories[directory] = _DirectorySync()
            state.requested += 1
            ticket = state.requested
            state.waiting += 1
            try:
                while state.synced < ticket:
                    if state.syncing:
                        self._changed.wait()
                        continue
                    self._sync(directory, state)
            finally:
                state.waiting -= 1
                if not state.waiting:
                    del self._directories[directory]

    def _sync(self, directory: str, state: _DirectorySync) -> None:
        """fsync with the lock released; a failure is raised to this caller and
        leaves the others to try again."""
        state.syncing = True
        covers = state.requested
        self._changed.release()
        try:
            fsync_directory(directory)
        finally:
            self._changed.acquire()
            state.syncing = False
            self._changed.notify_all()
        state.synced = max(state.synced, covers)


_new_syncs = DirectorySyncs()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # never created, or already renamed


# -- reading -------------------------------------------------------------------------------------

def _visible_files(folder: Path) -> list[os.DirEntry[str]]:
    """The messages of one folder: regular files (never a symlink, which could
    point at any file the server may read) whose names do not start with '.'."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    visible = []
    for entry in entries:
        try:
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                visible.append(entry)
        except OSError:
            continue
    return visible


def take_new(maildir: Path) -> list[Path]:
    """A reader's start: move new/ into cur/ (adding the info), then every
    message of cur/ in delivery order (mtime, then name).

    The rename keeps the unique name, so a crash before it is durable only
    means the message is found in new/ again, the same message.
    """
    new, cur = maildir / "new", maildir / "cur"
    arrived = _visible_files(new)
    if arrived:
        cur.mkdir(exist_ok=True)
    for entry in arrived:
        target = entry.name if ":" in entry.name else f"{entry.name}{INFO}"
        try:
            os.rename(entry.path, cur / target)
        except FileNotFoundError:
            continue  # taken away meanwhile
    listed = []
    for entry in _visible_files(cur):
        try:
            listed.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
        except FileNotFoundError:
            continue
    listed.sort()
    return [cur / name for _, name in listed]


def remove_and_flag(maildir: Path, removed: list[Path], seen: list[Path]) -> int:
    """A reader's end: unlink the ``removed`` messages, durably, and flag the
    ``seen`` ones; returns how many removals failed.

    new/ is synced first: the reader's renames out of it must be on disk
    before the unlinks, or a crash could bring a removed message back in new/.
    A lost seen flag harms no one, so the renames get no sync of their own.
    The sizes removed are noted in maildirsize, so the quota frees at once.
    """
    for path in seen:
        flagged = path.with_name(with_flag(path.name, SEEN))
        if flagged != path:
            try:
                os.rename(path, flagged)
            except OSError:
                continue  # the flag is a courtesy to other mail readers; the message was read
    if not removed:
        return 0
    _sync_if_present(maildir / "new")
    failures = 0
    freed: list[int] = []
    for path in removed:
        size = size_in_name(path.name)
        try:
            if size is None:
                size = os.stat(path, follow_symlinks=False).st_size
            os.unlink(path)
        except FileNotFoundError:
            continue  # already gone: the reader's wish holds
        except OSError:
            failures += 1
            continue
        freed.append(size)
    _sync_if_present(maildir / "cur")
    _note_in_maildirsize(maildir, [f"-{size} -1" for size in freed])
    return failures


def _sync_if_present(folder: Path) -> None:
    try:
        fsync_directory(folder)
    except FileNotFoundError:
        pass


# -- Maildir++ quota -----------------------------------------------------------------------------

def quota_spec(quota: int) -> str:
    """The first line of maildirsize for a limit of ``quota`` bytes."""
    return f"{quota}S"


def quota_allows(maildir: Path, quota: int, size: int) -> bool:
    """Whether a message of ``size`` bytes fits under ``quota`` bytes."""
    return quota_used(maildir, quota, size) + size <= quota


def quota_used(maildir: Path, quota: int, size: int = 0) -> int:
    """Bytes in use, from maildirsize (rebuilt when missing, or when stale and
    a message of ``size`` would not fit)."""
    spec = quota_spec(quota)
    path = maildir / "maildirsize"
    used = _usage_from_maildirsize(path, spec)
    if used is None:
        return _rebuild_maildirsize(maildir, spec)
    if used + size > quota and _is_stale(path):
        return _rebuild_maildirsize(maildir, spec)
    return used


def note_delivered(maildir: Path, size: int) -> None:
    """Maildir++: one ``size 1`` line per delivered message."""
    _note_in_maildirsize(maildir, [f"{size} 1"], create=True)


def _note_in_maildirsize(maildir: Path, lines: list[str], create: bool = False) -> None:
    """Append ``lines``; maildirsize is a cache, so trouble only means a
    rebuild later, when it looks wrong."""
    if not lines:
        return
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(maildir / "maildirsize", flags, 0o600)
    except OSError:
        return  # absent, and a reader does not start one
    try:
        os.write(fd, "".join(f"{line}\n" for line in lines).encode("ascii"))
    except OSError:
        pass
    finally:
        os.close(fd)


def _usage_from_maildirsize(path: Path, spec: str) -> int | None:
    """Bytes in use per maildirsize, or None when the file must be rebuilt."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAILDIRSIZE_MAX + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAILDIRSIZE_MAX:
        return None
    lines = raw.decode("ascii", "replace").split("\n")
    if lines[0].strip() != spec:
        return None
    used = 0
    for line in lines[1:]:
        fields = line.split()
        if not fields:
            continue
        try:
            used += int(fields[0])
        except ValueError:
            return None
    return used


def _is_stale(path: Path) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > MAILDIRSIZE_STALE
    except FileNotFoundError:
        return True


def _rebuild_maildirsize(maildir: Path, spec: str) -> int:
    """Count new/ and cur/ (sizes from ``,S=`` in names, else stat) and write maildirsize."""
    used = count = 0
    for sub in ("new", "cur"):
        try:
            entries = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            size = size_in_name(entry.name)
            if size is None:
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue  # moved from new/ to cur/ by a reader meanwhile
            used += size
            count += 1
    try:
        # Only a cache: a failed write leaves the count above standing, and the
        # next delivery tries again.  tmp/ is the Maildir's own scratch space.
        replace_file(maildir / "maildirsize", f"{spec}\n{used} {count}\n".encode("ascii"), durable=False,
                     scratch_dir=maildir / "tmp")
    except OSError:
        pass
    return used
