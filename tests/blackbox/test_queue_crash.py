"""kill -9 of a real server while its big queue is being recovered, compacted
or flushed: afterwards every acknowledged message is still queued, once, or
was delivered.  The queues are built offline (tests/support/queuefiles.py)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.support.fakesmtp import FakeSMTP
from tests.support.home import Home, child_environment, make_home
from tests.support.queuefiles import build_queue, read_back
from tests.support.server import Server
from tests.support.waiting import DEADLINE, DeadPort, wait_until

QREAD_ID = re.compile(r"#(\d+) ")


def queued_ids(home: Home) -> list[int]:
    """Every id qread lists (a duplicate would show twice)."""
    return [int(match) for match in QREAD_ID.findall(home.qread())]


def start_process(server: Server) -> subprocess.Popen:
    """twistd without waiting for its listeners: it may be killed before it has any."""
    with open(server.log_path, "ab") as log:
        return subprocess.Popen(server.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=server.home.path, env=child_environment())


def kill_when(process: subprocess.Popen, condition, what: str) -> None:
    """kill -9 once ``condition()`` holds (the server must still be running then)."""
    wait_until(lambda: condition() or process.poll() is not None, what)
    assert process.poll() is None, f"the server ended before {what}"
    process.kill()
    process.wait(DEADLINE)


def test_kill_9_while_the_index_is_being_rebuilt_loses_nothing(tmp_path: Path, dead_port: DeadPort) -> None:
    home = make_home(tmp_path / "home", controls={"smtproutes": f"dead.test:127.0.0.1:{dead_port.port}\n"})
    live = build_queue(home.path / "queue", 6000, "dead.test", with_index=False)
    server = Server(home, dns_port=dead_port.port)
    wal = home.path / "queue" / "index.sqlite-wal"
    for _ in range(3):  # each start reads the segments again from where the last one got to
        kill_when(start_process(server), lambda: wal.exists() and wal.stat().st_size > 0, "the rebuild to begin")
    with server:
        assert sorted(queued_ids(home)) == live
    assert sorted(read_back(home.path / "queue").messages) == live


def test_kill_9_while_segments_are_compacted_loses_and_duplicates_nothing(tmp_path: Path,
                                                                        dead_port: DeadPort) -> None:
    home = make_home(tmp_path / "home", controls={"smtproutes": f"dead.test:127.0.0.1:{dead_port.port}\n",
                                                  "queueactivelimit": "0\n"})  # every message may move
    live = build_queue(home.path / "queue", 8000, "dead.test", ended=lambda n: n % 4 != 0)
    seg = home.path / "queue" / "seg"
    [old] = seg.iterdir()
    server = Server(home, dns_port=dead_port.port)
    # Compaction runs at start: kill the server once copies are being written.
    kill_when(start_process(server), lambda: len(os.listdir(seg)) > 1, "compaction to write copies")
    with server:
        server.wait_for_log("compacted the queue")
        wait_until(lambda: not old.exists(), "the compacted segment to go")
        assert sorted(queued_ids(home)) == live
    found = read_back(home.path / "queue")
    assert sorted(found.messages) == live
    assert all(message.body.startswith(b"Subject: queued\n") for message in found.messages.values())


def test_kill_9_during_a_whole_queue_flush_loses_nothing(tmp_path: Path, dead_port: DeadPort) -> None:
    with FakeSMTP() as sink:
        home = make_home(tmp_path / "home", controls={"smtproutes": f"far.test:127.0.0.1:{sink.port}\n",
                                                      "queueactivelimit": "200\n"})
        live = build_queue(home.path / "queue", 1500, "far.test")
        server = Server(home, dns_port=dead_port.port).start()
        try:
            home.qtwist("queue", "flush")
            wait_until(lambda: len(sink.delivered()) >= 300, "the flush to deliver some")
            server.kill()
            delivered_before = {t.recipients[0] for t in sink.delivered()}
            remaining = set(queued_ids(home))
            assert remaining <= set(live)
            server.start()
            home.qtwist("queue", "flush")
            wait_until(lambda: home.qstat() == (0, 0), "an empty queue", timeout=120)
        finally:
            server.stop()
        recipients = {t.recipients[0] for t in sink.delivered()}
        assert recipients == {f"user{n}@far.test" for n in range(1500)}
        assert len(delivered_before) >= 300
