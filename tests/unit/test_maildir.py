"""Maildir names, delivery, reading and Maildir++ quotas (qtwist.maildir).

Quota as local delivery applies it is tested through ``local.deliver`` in
test_local.py; here are the functions themselves.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from qtwist import maildir
from qtwist.maildir import (
    INFO,
    MAILDIRSIZE_MAX,
    MAILDIRSIZE_STALE,
    SEEN,
    deliver,
    note_delivered,
    quota_allows,
    quota_used,
    remove_and_flag,
    size_in_name,
    take_new,
    unique_name,
    unique_part,
    with_flag,
)


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def box(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir")


def put(folder: Path, name: str, data: bytes = b"x", mtime: float | None = None) -> Path:
    path = folder / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


# -- names ---------------------------------------------------------------------------------------

def test_unique_names_are_distinct_across_threads():
    names: list[str] = []
    start = threading.Barrier(8)

    def make_names() -> None:
        start.wait(10)
        made = [unique_name(100) for _ in range(25)]
        names.extend(made)

    threads = [threading.Thread(target=make_names) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert len(names) == 200
    assert len(set(names)) == 200


def test_a_unique_name_carries_the_size_and_no_path_or_info_characters():
    name = unique_name(1234)
    assert name.endswith(",S=1234")
    assert "/" not in name and ":" not in name
    assert not name.startswith(".")
    assert size_in_name(name) == 1234


def test_unique_part_is_what_comes_before_the_info():
    assert unique_part("123.M4P5Q6.host,S=10:2,S") == "123.M4P5Q6.host,S=10"
    assert unique_part("123.M4P5Q6.host,S=10") == "123.M4P5Q6.host,S=10"
    assert unique_part("123.host:2,S:odd") == "123.host"


@pytest.mark.parametrize("name, size", [
    ("123.M4P5Q6.host,S=2048", 2048),
    ("123.M4P5Q6.host,S=2048:2,S", 2048),
    ("123.M4P5Q6.host,S=2048,W=2100:2,", 2048),
    ("123.M4P5Q6.host", None),
    ("123.M4P5Q6.host:2,S=99", None),  # the info is no size
    ("123.M4P5Q6.host,S=:2,", None),
])
def test_size_in_name(name: str, size: int | None):
    assert size_in_name(name) == size


@pytest.mark.parametrize("name, expected", [
    ("123.abc.host", "123.abc.host:2,S"),
    ("123.abc.host:2,", "123.abc.host:2,S"),
    ("123.abc.host:2,FT", "123.abc.host:2,FST"),
    ("123.abc.host:2,S", "123.abc.host:2,S"),
])
def test_seen_flag_is_added_in_ascii_order(name: str, expected: str) -> None:
    assert with_flag(name, SEEN) == expected


@pytest.mark.parametrize("name", [
    "123.abc.host:1,experimental",  # Maildir's experimental info
    "123.abc.host:3,S",
    "123.abc.host:",
    "123.abc.host:junk",
])
def test_an_info_field_not_understood_is_left_alone(name: str) -> None:
    assert with_flag(name, SEEN) == name


def test_lower_case_flags_sort_after_upper_case_ones():
    assert with_flag("123.abc.host:2,a", SEEN) == "123.abc.host:2,Sa"
    assert with_flag("123.abc.host:2,S", "R") == "123.abc.host:2,RS"


# -- deliver -------------------------------------------------------------------------------------

def test_deliver_puts_the_bytes_in_new_and_leaves_tmp_empty(box):
    data = b"Subject: hi\n\nbody\n"
    name = deliver(box, data, create=False)
    assert (box / "new" / name).read_bytes() == data
    assert os.listdir(box / "tmp") == []
    assert os.listdir(box / "cur") == []
    assert size_in_name(name) == len(data)
    assert stat.S_IMODE((box / "new" / name).stat().st_mode) == 0o600


def test_two_deliveries_make_two_files(box):
    first = deliver(box, b"one\n", create=False)
    second = deliver(box, b"two\n", create=False)
    assert first != second
    assert sorted(os.listdir(box / "new")) == sorted([first, second])


def test_deliver_with_create_makes_the_missing_folders(tmp_path):
    box = tmp_path / "alice" / "Maildir"
    name = deliver(box, b"hello\n", create=True)
    assert (box / "new" / name).read_bytes() == b"hello\n"
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((box / sub).stat().st_mode) & 0o077 == 0
    assert os.listdir(box / "tmp") == []


def test_deliver_without_create_refuses_a_missing_maildir(tmp_path):
    box = tmp_path / "alice" / "Maildir"
    with pytest.raises(FileNotFoundError):
        deliver(box, b"hello\n", create=False)
    assert not box.exists()


def test_deliver_without_new_raises_and_leaves_tmp_clean(tmp_path):
    box = tmp_path / "Maildir"
    (box / "tmp").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        deliver(box, b"hello\n", create=False)
    assert os.listdir(box / "tmp") == []


def test_a_failed_write_leaves_tmp_empty(box):
    # A real short write: the kernel refuses bytes past RLIMIT_FSIZE (EFBIG).
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old_limit[1]))
    try:
        with pytest.raises(OSError):
            deliver(box, b"x" * 5000, create=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.listdir(box / "tmp") == []
    assert os.listdir(box / "new") == []


# -- DirectorySyncs ------------------------------------------------------------------------------

def test_directory_fsyncs_are_shared_by_deliveries_that_wait_together(tmp_path, monkeypatch):
    directory = tmp_path / "new"
    directory.mkdir()
    first_started, release = threading.Event(), threading.Event()
    synced: list[str] = []
    real_fsync_dir = maildir.fsync_directory

    def counting_fsync_dir(path: str) -> None:
        synced.append(path)
        if len(synced) == 1:
            first_started.set()
            assert release.wait(10)
        real_fsync_dir(path)

    monkeypatch.setattr(maildir, "fsync_directory", counting_fsync_dir)
    syncs = maildir.DirectorySyncs()
    first = threading.Thread(target=syncs.sync, args=(str(directory),))
    first.start()
    assert first_started.wait(10)
    # Seven more deliveries finish while the first fsync runs: one more fsync covers them all.
    others = [threading.Thread(target=syncs.sync, args=(str(directory),)) for _ in range(7)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while syncs._directories[str(directory)].waiting < 8:
        assert time.monotonic() < deadline, "the other deliveries never reached the sync"
        time.sleep(0.001)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
        assert not thread.is_alive()
    assert synced == [str(directory)] * 2
    syncs.sync(str(directory))  # a later rename needs an fsync of its own
    assert len(synced) == 3


def test_a_failed_directory_fsync_reaches_its_caller_and_is_forgotten(tmp_path):
    syncs = maildir.DirectorySyncs()
    with pytest.raises(FileNotFoundError):
        syncs.sync(str(tmp_path / "absent"))
    assert syncs._directories == {}
    syncs.sync(str(tmp_path))


# -- take_new ------------------------------------------------------------------------------------

def test_take_new_moves_new_mail_to_cur_with_the_info(box):
    put(box / "new", "1.M1P1Q1.host,S=1", mtime=1000)
    assert take_new(box) == [box / "cur" / f"1.M1P1Q1.host,S=1{INFO}"]
    assert os.listdir(box / "new") == []


def test_take_new_keeps_an_info_already_there(box):
    put(box / "new", "1.M1P1Q1.host:2,F")
    assert take_new(box) == [box / "cur" / "1.M1P1Q1.host:2,F"]


def test_take_new_ignores_dot_files_directories_and_symlinks(box, tmp_path):
    secret = put(tmp_path, "secret", b"not mail")
    put(box / "new", ".hidden")
    (box / "new" / "adirectory").mkdir()
    (box / "new" / "alink").symlink_to(secret)
    put(box / "cur", ".hidden-too")
    (box / "cur" / "adirectory-too").mkdir()
    (box / "cur" / "alink-too").symlink_to(secret)
    put(box / "new", "2.M1P1Q1.host")
    assert take_new(box) == [box / "cur" / f"2.M1P1Q1.host{INFO}"]
    assert sorted(os.listdir(box / "new")) == [".hidden", "adirectory", "alink"]


def test_take_new_lists_cur_by_mtime_then_name(box):
    put(box / "cur", "c:2,S", mtime=1000)
    put(box / "new", "b", mtime=3000)
    put(box / "new", "a", mtime=2000)
    put(box / "cur", "z:2,", mtime=2000)
    assert [path.name for path in take_new(box)] == ["c:2,S", "a:2,", "z:2,", "b:2,"]


def test_take_new_without_new_lists_cur(box):
    (box / "new").rmdir()
    put(box / "cur", "1.host:2,S")
    assert take_new(box) == [box / "cur" / "1.host:2,S"]


def test_take_new_makes_cur_when_mail_arrived(box):
    (box / "cur").rmdir()
    put(box / "new", "1.host")
    assert take_new(box) == [box / "cur" / f"1.host{INFO}"]


def test_take_new_of_an_empty_or_missing_maildir_is_empty(box, tmp_path):
    assert take_new(box) == []
    assert take_new(tmp_path / "absent") == []
    (box / "cur").rmdir()
    assert take_new(box) == []


# -- remove_and_flag -----------------------------------------------------------------------------

def test_remove_and_flag_unlinks_the_removed_and_flags_the_seen(box):
    gone = put(box / "cur", "1.host,S=1:2,")
    read = put(box / "cur", "2.host,S=1:2,")
    kept = put(box / "cur", "3.host,S=1:2,")
    assert remove_and_flag(box, [gone], [read]) == 0
    assert sorted(os.listdir(box / "cur")) == ["2.host,S=1:2,S", kept.name]


def test_remove_and_flag_with_nothing_removed_only_flags(box):
    read = put(box / "cur", "2.host:2,T")
    assert remove_and_flag(box, [], [read]) == 0
    assert os.listdir(box / "cur") == ["2.host:2,ST"]


def test_a_missing_message_is_not_a_failure(box):
    assert remove_and_flag(box, [box / "cur" / "gone.host:2,"], [box / "cur" / "gone-too.host:2,"]) == 0


def test_remove_and_flag_counts_the_removals_that_failed(box):
    (box / "cur" / "notafile:2,").mkdir()  # unlink() refuses a directory
    removable = put(box / "cur", "1.host:2,")
    assert remove_and_flag(box, [box / "cur" / "notafile:2,", removable], []) == 1
    assert os.listdir(box / "cur") == ["notafile:2,"]


def test_removals_are_noted_in_an_existing_maildirsize(box):
    (box / "maildirsize").write_text("1000S\n30 2\n")
    named = put(box / "cur", "1.host,S=20:2,", b"not twenty bytes")
    unnamed = put(box / "cur", "2.host:2,", b"0123456789")
    assert remove_and_flag(box, [named, unnamed, box / "cur" / "3.host,S=99:2,"], []) == 0
    assert (box / "maildirsize").read_text() == "1000S\n30 2\n-20 -1\n-10 -1\n"
    assert quota_used(box, 1000) == 0


def test_remove_and_flag_does_not_start_a_maildirsize(box):
    gone = put(box / "cur", "1.host,S=20:2,")
    assert remove_and_flag(box, [gone], []) == 0
    assert not (box / "maildirsize").exists()


# -- Maildir++ quota ------------------------------------------------------------------------------

def test_quota_used_rebuilds_a_missing_maildirsize_from_the_folder(box):
    put(box / "new", "1.host,S=300", b"x")
    put(box / "cur", "2.host:2,S", b"y" * 50)
    put(box / "cur", ".hidden", b"z" * 1000)
    assert quota_used(box, 1000) == 350
    assert (box / "maildirsize").read_text() == "1000S\n350 2\n"
    assert os.listdir(box / "tmp") == []


def test_quota_used_rebuilds_an_oversized_maildirsize(box):
    put(box / "cur", "1.host,S=300:2,")
    (box / "maildirsize").write_text("1000S\n" + "1 1\n" * (MAILDIRSIZE_MAX // 4 + 1))
    assert quota_used(box, 1000) == 300
    assert (box / "maildirsize").read_text() == "1000S\n300 1\n"


def test_quota_used_rebuilds_a_maildirsize_of_another_quota(box):
    put(box / "cur", "1.host,S=300:2,")
    (box / "maildirsize").write_text("5000S\n0 0\n")
    assert quota_used(box, 1000) == 300
    assert (box / "maildirsize").read_text() == "1000S\n300 1\n"


def test_quota_used_rebuilds_an_unreadable_maildirsize(box):
    put(box / "cur", "1.host,S=300:2,")
    (box / "maildirsize").write_text("1000S\n0 0\nnonsense 1\n")
    assert quota_used(box, 1000) == 300


def test_quota_used_trusts_a_fresh_maildirsize(box):
    put(box / "cur", "1.host,S=300:2,")  # not noted: the file is what counts
    (box / "maildirsize").write_text("1000S\n100 1\n40 1\n\n")
    assert quota_used(box, 1000) == 140
    assert quota_used(box, 1000, size=2000) == 140  # over quota, but fresh: no recount


def stale(path: Path) -> None:
    past = time.time() - MAILDIRSIZE_STALE - 60
    os.utime(path, (past, past))


def test_a_stale_maildirsize_is_trusted_while_the_message_fits(box):
    put(box / "cur", "1.host,S=300:2,")
    (box / "maildirsize").write_text("1000S\n100 1\n")
    stale(box / "maildirsize")
    assert quota_used(box, 1000, size=100) == 100
    assert (box / "maildirsize").read_text() == "1000S\n100 1\n"


def test_a_stale_maildirsize_is_checked_against_the_folder_when_over_quota(box):
    put(box / "cur", "1.host,S=300:2,")
    (box / "maildirsize").write_text("1000S\n900 1\n")  # a reader removed mail without noting it
    stale(box / "maildirsize")
    assert quota_used(box, 1000, size=200) == 300
    assert (box / "maildirsize").read_text() == "1000S\n300 1\n"


def test_quota_allows_what_fits(box):
    (box / "maildirsize").write_text("1000S\n600 1\n")
    assert quota_allows(box, 1000, 400)
    assert not quota_allows(box, 1000, 401)


def test_note_delivered_appends_a_line(box):
    (box / "maildirsize").write_text("1000S\n0 0\n")
    note_delivered(box, 123)
    note_delivered(box, 7)
    assert (box / "maildirsize").read_text() == "1000S\n0 0\n123 1\n7 1\n"
    assert quota_used(box, 1000) == 130


def test_note_delivered_creates_maildirsize(box):
    note_delivered(box, 123)
    assert (box / "maildirsize").read_text() == "123 1\n"
    assert stat.S_IMODE((box / "maildirsize").stat().st_mode) == 0o600
