"""POP-before-SMTP grants: one file per client IP in HOME/open-smtp/."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from qtwist.control import Settings
from qtwist.grants import Grants, GrantsCleaner, grant_name


def test_record_creates_one_file_named_after_the_ip(tmp_path: Path) -> None:
    Grants(tmp_path).record("192.0.2.7")
    assert os.listdir(tmp_path / "open-smtp") == ["192.0.2.7"]


def test_record_again_only_touches_the_file(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    grants = Grants(tmp_path, clock=clock)
    grants.record("192.0.2.7")
    path = tmp_path / "open-smtp" / "192.0.2.7"
    inode = path.stat().st_ino
    clock.advance(500)
    grants.record("192.0.2.7")
    assert path.stat().st_ino == inode
    assert path.stat().st_mtime == 1_000_500


def test_grant_is_live_until_the_lifetime_has_passed(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    grants = Grants(tmp_path, clock=clock)
    grants.record("192.0.2.7")
    clock.advance(3599)
    assert grants.is_live("192.0.2.7", 3600)
    clock.advance(1)
    assert not grants.is_live("192.0.2.7", 3600)
    assert grants.is_live("192.0.2.7", 3600, now=1_000_100)


def test_grant_made_with_the_system_clock_is_live_now(tmp_path: Path) -> None:
    grants = Grants(tmp_path)
    grants.record("192.0.2.7")
    assert grants.is_live("192.0.2.7", 10800)
    assert not grants.is_live("192.0.2.7", 10800, now=time.time() + 10801)


def test_ip_without_grant_is_not_live(tmp_path: Path) -> None:
    grants = Grants(tmp_path)
    grants.record("192.0.2.7")
    assert not grants.is_live("192.0.2.8", 10800)
    assert not Grants(tmp_path / "elsewhere").is_live("192.0.2.7", 10800)


def test_ipv6_grant_file_name_has_no_colon_and_lists_as_the_address(tmp_path: Path) -> None:
    grants = Grants(tmp_path)
    grants.record("2001:DB8:0:0::1")
    [name] = os.listdir(tmp_path / "open-smtp")
    assert ":" not in name
    assert [ip for ip, _ in grants.list()] == ["2001:db8::1"]
    assert grants.is_live("2001:db8::1", 10800)


def test_ipv4_mapped_ipv6_shares_the_ipv4_grant(tmp_path: Path) -> None:
    grants = Grants(tmp_path)
    grants.record("::ffff:192.0.2.7")
    assert grants.is_live("192.0.2.7", 10800)
    assert grant_name("::ffff:192.0.2.7") == "192.0.2.7"


@pytest.mark.parametrize("bogus", ["../control/me", "", "example.test", "192.0.2.7/24"])
def test_not_an_ip_gets_no_grant_file(tmp_path: Path, bogus: str) -> None:
    grants = Grants(tmp_path)
    with pytest.raises(ValueError):
        grants.record(bogus)
    assert not grants.is_live(bogus, 10800)
    assert not (tmp_path / "open-smtp").exists()


def test_list_shows_each_ip_with_its_age_oldest_first(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    grants = Grants(tmp_path, clock=clock)
    grants.record("192.0.2.1")
    clock.advance(60)
    grants.record("192.0.2.2")
    clock.advance(40)
    assert grants.list() == [("192.0.2.1", 100.0), ("192.0.2.2", 40.0)]


def test_list_ignores_dotfiles_and_a_missing_directory(tmp_path: Path) -> None:
    grants = Grants(tmp_path)
    assert grants.list() == []
    grants.record("192.0.2.1")
    (tmp_path / "open-smtp" / ".editor-swap").write_text("")
    assert [ip for ip, _ in grants.list()] == ["192.0.2.1"]


def test_clear_removes_every_grant(tmp_path: Path) -> None:
    grants = Grants(tmp_path)
    grants.record("192.0.2.1")
    grants.record("2001:db8::1")
    assert grants.clear() == 2
    assert grants.list() == []
    assert not grants.is_live("192.0.2.1", 10800)
    assert Grants(tmp_path / "elsewhere").clear() == 0


def test_clear_older_keeps_the_younger_grants(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    grants = Grants(tmp_path, clock=clock)
    grants.record("192.0.2.1")
    clock.advance(600)
    grants.record("192.0.2.2")
    clock.advance(100)
    assert grants.clear(older=300) == 1
    assert [ip for ip, _ in grants.list()] == ["192.0.2.2"]


def test_expire_removes_exactly_the_grants_that_are_no_longer_live(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    grants = Grants(tmp_path, clock=clock)
    grants.record("192.0.2.1")
    clock.advance(3600)
    grants.record("192.0.2.2")
    assert not grants.is_live("192.0.2.1", 3600)
    assert grants.expire(3600) == 1
    assert [ip for ip, _ in grants.list()] == ["192.0.2.2"]


def test_grants_survive_a_new_grants_object(tmp_path: Path) -> None:
    Grants(tmp_path).record("192.0.2.1")
    assert Grants(tmp_path).is_live("192.0.2.1", 10800)


class GrantsCleanerTests(unittest.TestCase):
    """The cleaner runs expire in a worker thread, with relaygrantlifetime as now in force."""

    @defer.inlineCallbacks
    def test_cleaner_removes_expired_grants_and_keeps_live_ones(self):
        home = Path(tempfile.mkdtemp(prefix="qtwist-grants-"))
        self.addCleanup(shutil.rmtree, home)
        grants = Grants(home)
        grants.record("192.0.2.1")
        grants.record("192.0.2.2")
        stale = home / "open-smtp" / "192.0.2.1"
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        settings = Settings(me="mx.example.test", relaygrantlifetime=3600)
        cleaner = GrantsCleaner(grants, lambda: settings)
        cleaner.startService()
        self.addCleanup(cleaner.stopService)
        deadline = time.monotonic() + 10
        while stale.exists():
            self.assertLess(time.monotonic(), deadline, "the cleaner never removed the expired grant")
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([ip for ip, _ in grants.list()], ["192.0.2.2"])

    @defer.inlineCallbacks
    def test_cleaner_runs_again_every_interval_with_the_lifetime_then_in_force(self):
        home = Path(tempfile.mkdtemp(prefix="qtwist-grants-"))
        self.addCleanup(shutil.rmtree, home)
        grants = Grants(home)
        settings = [Settings(me="mx.example.test", relaygrantlifetime=3600)]
        clock = task.Clock()
        cleaner = GrantsCleaner(grants, lambda: settings[0], interval=300, clock=clock)
        cleaner.startService()
        self.addCleanup(cleaner.stopService)
        deadline = time.monotonic() + 10
        while not clock.getDelayedCalls():  # the first run is over once the next is scheduled
            self.assertLess(time.monotonic(), deadline, "the first run never finished")
            yield task.deferLater(reactor, 0.01, lambda: None)
        grants.record("192.0.2.1")
        half_hour_ago = time.time() - 1800
        os.utime(home / "open-smtp" / "192.0.2.1", (half_hour_ago, half_hour_ago))
        settings[0] = Settings(me="mx.example.test", relaygrantlifetime=600)  # a reload shortens it
        clock.advance(300)
        while grants.list():
            self.assertLess(time.monotonic(), deadline, "the second run never removed the grant")
            yield task.deferLater(reactor, 0.01, lambda: None)
