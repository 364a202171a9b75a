"""Every periodic job survives its own errors: it raises once, logs once with
its name, and runs again at its next tick (qtwist.periodic and its users)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from qtwist import control, lspawn, send
from qtwist.control import ControlWatcher, Settings
from qtwist.delivery import Outcome
from qtwist.grants import Grants, GrantsCleaner
from qtwist.periodic import Periodic
from qtwist.queue import Queue, QueueError
from qtwist.queue import writer as queue_writer
from qtwist.queue.admin import queue_flush
from tests.support.home import edit_file, make_home
from tests.support.memory import MemoryHome, SchedulerRig, wait_for


class RaisesOnce:
    """A stand-in for a function that fails the first time it is called."""

    def __init__(self, real, error: Exception) -> None:
        self.real = real
        self.error = error
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.real(*args, **kwargs)


def texts(events: list[dict]) -> list[str]:
    return [formatEvent(event) for event in events]


# -- the mechanism ------------------------------------------------------------------------------

def test_a_job_that_raises_is_logged_once_by_name_and_keeps_running():
    clock = Clock()
    runs = []

    def job() -> None:
        runs.append(clock.seconds())
        if len(runs) in (2, 3):
            raise OSError(24, "Too many open files")

    periodic = Periodic("cleaning the cellar", job, 10, clock)
    periodic.startService()
    with capturedLogs() as events:
        clock.pump([10] * 4)
    periodic.stopService()
    assert runs == [10, 20, 30, 40]
    logged = texts(events)
    assert [line for line in logged if "failed" in line] == [
        "cleaning the cellar failed; it runs again every 10 s"]
    assert logged.count("cleaning the cellar works again") == 1
    assert [event["log_failure"].value.strerror for event in events if "log_failure" in event] == [
        "Too many open files"]


def test_a_job_whose_deferred_fails_keeps_running_and_the_next_run_waits_for_it():
    clock = Clock()
    answers = [fail(RuntimeError("down")), succeed(None)]
    periodic = Periodic("asking the database", lambda: answers.pop(0), 5, clock, now=True)
    with capturedLogs() as events:
        periodic.startService()
        clock.advance(5)
    periodic.stopService()
    assert answers == []
    assert texts(events) == ["asking the database failed; it runs again every 5 s",
                             "asking the database works again"]


# -- the jobs ----------------------------------------------------------------------------------

def test_the_control_watcher_reloads_after_a_failed_look(tmp_path, monkeypatch):
    (tmp_path / "control").mkdir()
    clock = Clock()
    watcher = ControlWatcher(tmp_path, clock=clock)
    watcher.startService()
    try:
        edit_file(tmp_path / "control" / "databytes", "2000\n")
        monkeypatch.setattr(control, "load", RaisesOnce(control.load, OSError(24, "Too many open files")))
        with capturedLogs() as events:
            clock.advance(1)
            assert watcher.settings.databytes == 0
            edit_file(tmp_path / "control" / "databytes", "3000\n")  # a change the failed look missed
            clock.advance(1)
        assert watcher.settings.databytes == 3000
        assert "control: looking for changed control files works again" in texts(events)
    finally:
        watcher.stopService()


def test_the_delivery_childs_settings_survive_a_failed_look(tmp_path, monkeypatch, capsys):
    (tmp_path / "control").mkdir()
    fresh = lspawn._FreshSettings(tmp_path)
    monkeypatch.setattr(fresh.control, "poll", RaisesOnce(fresh.control.poll, OSError(24, "Too many open files")))
    edit_file(tmp_path / "control" / "databytes", "2000\n")
    fresh._checked -= 2
    assert fresh().databytes == 0  # the last good settings
    assert "looking for changed control files failed" in capsys.readouterr().err
    fresh._checked -= 2
    assert fresh().databytes == 2000


class ThreadedJobTests(TestCase):
    """Jobs whose work runs in threads: the real reactor brings the answers back."""

    def setUp(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="qtwist-periodic-"))
        self.addCleanup(shutil.rmtree, self.path, True)

    async def test_the_grant_cleaner_removes_expired_grants_after_a_failed_run(self) -> None:
        grants = Grants(self.path)
        grants.record("192.0.2.1")
        stale = self.path / "open-smtp" / "192.0.2.1"
        os.utime(stale, (time.time() - 7200,) * 2)
        grants.expire = RaisesOnce(grants.expire, PermissionError(13, "Permission denied"))
        clock = Clock()
        cleaner = GrantsCleaner(grants, lambda: Settings(me="mx.example.test", relaygrantlifetime=3600),
                                interval=300, clock=clock)
        with capturedLogs() as events:
            cleaner.startService()
            self.addCleanup(cleaner.stopService)
            await wait_for(lambda: grants.expire.calls == 1 and cleaner.failing, "the first run to fail")
            clock.advance(300)
            await wait_for(lambda: not stale.exists(), "the second run to remove the grant")
        self.assertIn("grants: removing expired relay grants failed; it runs again every 300 s",
                      texts(events))
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)

    async def test_the_schedulers_request_poll_takes_a_flush_after_a_failed_look(self) -> None:
        make_home(self.path)
        home = MemoryHome(self.path)
        rig = SchedulerRig(home).start()
        self.addCleanup(rig.stop)
        await rig.send("alice@example.test", ["x@remote.test"])
        (await rig.remote.take()).answer(Outcome.deferral("try later"))
        await rig.settled()
        original = send.take_flush_request
        send.take_flush_request = RaisesOnce(original, OSError(24, "Too many open files"))
        self.addCleanup(setattr, send, "take_flush_request", original)
        queue_flush(self.path)
        with capturedLogs() as events:
            rig.clock.advance(1)
            self.assertEqual(rig.remote.waiting, [])
            rig.clock.advance(1)
            self.assertEqual((await rig.remote.take()).recipients, ["x@remote.test"])
            again = "queue requests: looking at queue/rm/, queue/flush and queue/todo/ works again"
            await wait_for(lambda: again in texts(events), "the look to work again")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    async def test_a_failed_queue_write_fails_its_message_and_the_writer_goes_on(self) -> None:
        queue = Queue(self.path, reactor)
        queue.open(1000)
        self.addCleanup(queue.close)
        real_open = os.open

        def no_descriptors(path, flags, *args):
            if "seg" in str(path) and no_descriptors.left:
                no_descriptors.left -= 1
                raise OSError(24, "Too many open files")
            return real_open(path, flags, *args)
        no_descriptors.left = 1
        self.patch(queue_writer.os, "open", no_descriptors)
        with pytest.raises(QueueError, match="Too many open files"):
            await queue.accept("a@remote.test", ["b@example.test"], b"first\n")
        message = await queue.accept("a@remote.test", ["b@example.test"], b"second\n")
        self.assertEqual(await deferToThread(message.read_body), b"second\n")
