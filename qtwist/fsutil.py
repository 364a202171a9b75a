"""Small file-system promises the rest of qtwist builds on.

Durability needs two fsyncs: the file's, then its directory's, or a crash can
lose the name that points at the data.  Readers that must never see half a
file get a new file renamed over the old.  And a long-lived process notices
an admin's edit by a file's stat signature, so it re-reads only what changed.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

# What tells us a file changed without reading it: mtime, size and inode (an
# edit by rename keeps the size and may keep the second, never the inode).
Signature = tuple[int, int, int]


def fsync_directory(directory: str | Path) -> None:
    """Make the names created, renamed or removed in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_file(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True,
                 scratch_dir: Path | None = None) -> None:
    """Put ``data`` at ``path`` so that readers see the old file or the new one, never half.

    The scratch file's name starts with a dot, beside ``path`` unless
    ``scratch_dir`` (on the same file system) says where, so directory scans
    that skip dot files never take it for the real one.  ``durable`` fsyncs
    the file and the directory; a cache that can be rebuilt skips that.
    """
    fd, scratch = tempfile.mkstemp(dir=scratch_dir or path.parent, prefix=f".{path.name}.")
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(scratch, path)
    except BaseException:
        try:
            os.unlink(scratch)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_directory(path.parent)


def stat_signature(path: str | Path) -> Signature | None:
    """The file's signature, or None when it is absent."""
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


class StatCache(Generic[T]):
    """Files loaded once per signature: ``load(path)`` runs again only when the
    file's stat changed.  Safe to share between threads.

    A change between the stat and the load leaves an old signature beside new
    content, so the next look loads again: stale content never sticks.
    """

    def __init__(self, load: Callable[[Path], T]) -> None:
        self._load = load
        self._entries: dict[Path, tuple[Signature, T]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, reload: bool = False) -> T | None:
        """What ``load`` made of the file, or None when it is absent; ``reload``
        ignores the signature.  Errors of ``load`` (OSError...) reach the caller."""
        signature = stat_signature(path)
        if signature is None:
            with self._lock:
                self._entries.pop(path, None)
            return None
        with self._lock:
            cached = self._entries.get(path)
        if cached is not None and cached[0] == signature and not reload:
            return cached[1]
        try:
            value = self._load(path)
        except FileNotFoundError:  # removed since the stat
            self.forget(path)
            return None
        with self._lock:
            self._entries[path] = (signature, value)
        return value

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)
