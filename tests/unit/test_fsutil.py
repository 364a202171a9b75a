"""File-system promises: whole-file replacement, fsyncs, stat signatures and the stat cache (qtwist.fsutil)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qtwist import fsutil
from qtwist.fsutil import StatCache, fsync_directory, replace_file, stat_signature, write_all

BIG = b"new content line\n" * 200_000  # a few MB: more than one write() may take


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- replace_file ----------------------------------------------------------------------------------

def test_replace_file_puts_the_data_at_the_path(tmp_path):
    target = tmp_path / "control"
    replace_file(target, b"first\n")
    replace_file(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert os.listdir(tmp_path) == ["control"]


def test_the_old_content_stays_whole_until_the_new_file_is_renamed_over_it(tmp_path, monkeypatch):
    target = tmp_path / "table"
    target.write_bytes(b"old content\n")
    seen_at_rename = []
    real_rename = os.rename

    def watching_rename(source, destination):
        # The moment before the switch: the old name still holds the old bytes,
        # and the new bytes are complete in the scratch file.
        seen_at_rename.append((Path(destination).read_bytes(), Path(source).read_bytes()))
        real_rename(source, destination)

    monkeypatch.setattr(fsutil.os, "rename", watching_rename)
    with open(target, "rb") as reader_before:
        replace_file(target, BIG)
        assert reader_before.read() == b"old content\n"  # a reader that opened it earlier sees the old file
    assert seen_at_rename == [(b"old content\n", BIG)]
    assert target.read_bytes() == BIG


def test_replace_file_applies_the_mode_whatever_the_umask(tmp_path):
    old_umask = os.umask(0o777)
    try:
        replace_file(tmp_path / "open", b"x", 0o644)
        replace_file(tmp_path / "private", b"x")
    finally:
        os.umask(old_umask)
    assert mode_of(tmp_path / "open") == 0o644
    assert mode_of(tmp_path / "private") == 0o600


def test_replace_file_without_durability_still_replaces_whole(tmp_path):
    target = tmp_path / "cache"
    target.write_bytes(b"stale")
    replace_file(target, BIG, 0o640, durable=False)
    assert target.read_bytes() == BIG
    assert mode_of(target) == 0o640
    assert os.listdir(tmp_path) == ["cache"]


@pytest.fixture
def scratch_names(monkeypatch) -> list[Path]:
    """The files replace_file renames into place, as it renames them."""
    names: list[Path] = []
    real_rename = os.rename

    def watching_rename(source, destination):
        names.append(Path(source))
        real_rename(source, destination)

    monkeypatch.setattr(fsutil.os, "rename", watching_rename)
    return names


def test_replace_file_takes_its_scratch_file_in_scratch_dir(tmp_path, scratch_names):
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    target = tmp_path / "maildirsize"
    replace_file(target, b"1000S\n0 0\n", scratch_dir=scratch_dir)
    [scratch] = scratch_names
    assert scratch.parent == scratch_dir
    assert scratch.name.startswith(".maildirsize.")
    assert target.read_bytes() == b"1000S\n0 0\n"
    assert os.listdir(scratch_dir) == []


def test_scratch_files_are_dot_files_beside_the_target(tmp_path, scratch_names):
    target = tmp_path / "vpasswd"
    replace_file(target, b"line\n")
    [scratch] = scratch_names
    assert scratch.parent == tmp_path
    assert scratch.name.startswith(".vpasswd.")


def test_a_failed_replace_leaves_no_scratch_file(tmp_path):
    in_the_way = tmp_path / "control"
    (in_the_way / "inside").mkdir(parents=True)  # a directory where the file should go
    with pytest.raises(OSError):
        replace_file(in_the_way, b"data")
    assert sorted(os.listdir(tmp_path)) == ["control"]
    assert os.listdir(in_the_way) == ["inside"]


def test_a_failed_replace_with_a_scratch_dir_leaves_it_empty(tmp_path):
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    (tmp_path / "maildirsize").mkdir()
    with pytest.raises(OSError):
        replace_file(tmp_path / "maildirsize", b"data", durable=False, scratch_dir=scratch_dir)
    assert os.listdir(scratch_dir) == []


def test_replace_file_into_a_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        replace_file(tmp_path / "absent" / "file", b"data")
    assert os.listdir(tmp_path) == []


# -- fsync_directory and write_all -----------------------------------------------------------------

def test_fsync_directory_syncs_a_real_directory(tmp_path):
    (tmp_path / "new").write_bytes(b"x")
    fsync_directory(tmp_path)
    fsync_directory(str(tmp_path))


def test_fsync_directory_of_a_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsync_directory(tmp_path / "absent")


def test_write_all_writes_every_byte(tmp_path):
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_all(fd, BIG)
        write_all(fd, b"")
    finally:
        os.close(fd)
    assert target.read_bytes() == BIG


# -- stat_signature --------------------------------------------------------------------------------

def test_stat_signature_of_an_absent_file_is_none(tmp_path):
    assert stat_signature(tmp_path / "absent") is None
    (tmp_path / "file").write_text("x")
    assert stat_signature(tmp_path / "file" / "below") is None  # a file where a directory should be


def test_stat_signature_changes_on_rewrite_by_rename_with_same_size_and_mtime(tmp_path):
    target = tmp_path / "vpasswd"
    target.write_bytes(b"alice:one\n")
    before = stat_signature(target)
    status = target.stat()
    replacement = tmp_path / "vpasswd.new"
    replacement.write_bytes(b"alice:two\n")
    os.utime(replacement, ns=(status.st_atime_ns, status.st_mtime_ns))
    os.rename(replacement, target)
    after = stat_signature(target)
    assert after is not None and before is not None
    assert after[:2] == before[:2]  # same mtime, same size...
    assert after != before  # ...and still seen as changed


def test_stat_signature_is_stable_while_the_file_is_untouched(tmp_path):
    target = tmp_path / "me"
    target.write_text("mx.example.test\n")
    assert stat_signature(target) == stat_signature(str(target))


# -- StatCache -------------------------------------------------------------------------------------

class CountingLoader:
    """Reads the file, counting the reads."""

    def __init__(self) -> None:
        self.loads: list[Path] = []

    def __call__(self, path: Path) -> bytes:
        self.loads.append(path)
        return path.read_bytes()


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, "CountingLoader", StatCache]:
    """A file, a loader that counts its loads, and a StatCache over it."""
    target = tmp_path / "rcpthosts"
    target.write_bytes(b"example.test\n")
    loader = CountingLoader()
    return target, loader, StatCache(loader)


def test_stat_cache_loads_once_per_signature(cached):
    target, loader, cache = cached
    assert cache.get(target) == b"example.test\n"
    assert cache.get(target) == b"example.test\n"
    assert len(loader.loads) == 1


def test_stat_cache_reloads_a_changed_file(cached):
    target, loader, cache = cached
    cache.get(target)
    replace_file(target, b"other.test\n", durable=False)
    assert cache.get(target) == b"other.test\n"
    assert len(loader.loads) == 2


def test_stat_cache_reload_ignores_the_signature(cached):
    target, loader, cache = cached
    cache.get(target)
    assert cache.get(target, reload=True) == b"example.test\n"
    assert len(loader.loads) == 2


def test_stat_cache_gives_none_for_an_absent_file_and_forgets_it(cached):
    target, loader, cache = cached
    cache.get(target)
    target.unlink()
    assert cache.get(target) is None
    assert cache._entries == {}  # no memory kept for files that went away
    assert len(loader.loads) == 1
    target.write_bytes(b"back.test\n")
    assert cache.get(target) == b"back.test\n"


def test_stat_cache_gives_none_when_the_file_goes_between_stat_and_load(tmp_path):
    target = tmp_path / "rcpthosts"
    target.write_bytes(b"example.test\n")

    def removed_meanwhile(path: Path) -> bytes:
        path.unlink()  # another process removes it just after the stat
        return path.read_bytes()

    cache = StatCache(removed_meanwhile)
    assert cache.get(target) is None
    assert cache._entries == {}


def test_stat_cache_passes_the_loaders_oserror_to_the_caller(tmp_path):
    directory = tmp_path / "vpasswd"
    directory.mkdir()  # stat works, reading does not
    cache = StatCache(Path.read_bytes)
    with pytest.raises(IsADirectoryError):
        cache.get(directory)


def test_stat_cache_passes_the_loaders_other_errors_to_the_caller(tmp_path):
    target = tmp_path / "tcp.smtp"
    target.write_bytes(b"\xff\n")
    cache = StatCache(lambda path: path.read_bytes().decode("ascii"))
    with pytest.raises(UnicodeDecodeError):
        cache.get(target)


def test_stat_cache_forget_makes_the_next_look_load_again(cached):
    target, loader, cache = cached
    cache.get(target)
    cache.forget(target)
    cache.forget(target.with_name("never-seen"))
    assert cache.get(target) == b"example.test\n"
    assert len(loader.loads) == 2


def test_stat_cache_keeps_each_path_apart(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"A")
    second.write_bytes(b"B")
    cache = StatCache(Path.read_bytes)
    assert (cache.get(first), cache.get(second)) == (b"A", b"B")
