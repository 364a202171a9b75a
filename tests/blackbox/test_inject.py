"""``qtwist sendmail`` for real: the command (``python -m qtwist sendmail``) as
PHP's mail() and cron run it, and a real ``twistd qmail`` that takes what it
leaves in queue/todo/ and delivers it to Maildirs and, by smtproutes, to a sink."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterator

import pytest

from qtwist.queue.todo import TODO_BATCH_FILES, drop_todo
from tests.support.fakesmtp import FakeSMTP
from tests.support.home import DOMAIN, Home, ME, child_environment, make_home
from tests.support.server import Server
from tests.support.waiting import wait_until

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
REMOTE = "remote.test"
UID = os.getuid()
INVOKED = re.compile(rb"Received: \(qtwist invoked by uid (\d+)\); (.+)\n")


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def sendmail(home: Home, *arguments: str, message: bytes, **environment: str) -> subprocess.CompletedProcess:
    """``qtwist --home HOME sendmail ARGUMENTS < message`` as user "cron", with
    none of the variables that would name another sender unless given."""
    env = {name: value for name, value in child_environment().items()
           if name not in ("QMAILUSER", "MAILUSER", "LOGNAME", "QMAILHOST", "MAILHOST",
                           "QMAILNAME", "MAILNAME", "NAME")}
    env.update({"USER": "cron", **environment})
    return subprocess.run([sys.executable, "-m", "qtwist", "--home", str(home.path), "sendmail", *arguments],
                          input=message, capture_output=True, env=env, timeout=60)


def injected(result: subprocess.CompletedProcess) -> None:
    assert (result.returncode, result.stderr, result.stdout) == (0, b"", b""), result


def header_and_body(stored: bytes) -> tuple[list[bytes], bytes]:
    """The header lines of a stored message (unfolded fields are one line in
    these tests) and its body."""
    header, _, body = stored.partition(b"\n\n")
    return header.split(b"\n"), body


def fields_named(lines: list[bytes], name: bytes) -> list[bytes]:
    return [line for line in lines if line.lower().startswith(name.lower() + b":")]


def todo_files(home: Home) -> list[Path]:
    todo = home.path / "queue" / "todo"
    return sorted(p for p in todo.iterdir() if not p.name.startswith(".")) if todo.is_dir() else []


@pytest.fixture(scope="module")
def sink() -> Iterator[FakeSMTP]:
    server = FakeSMTP()
    yield server
    server.close()


def routed_home(path: Path, sink: FakeSMTP) -> Home:
    return make_home(path, controls={"smtproutes": f"{REMOTE}:127.0.0.1:{sink.port}\n"})


@pytest.fixture(scope="module")
def mx(tmp_path_factory, sink: FakeSMTP) -> Iterator[Server]:
    """The shared server: example.test is local, remote.test goes to the sink."""
    server = Server(routed_home(tmp_path_factory.mktemp("inject"), sink)).start()
    yield server
    server.stop()


# -- with the server running ------------------------------------------------------

def test_message_reaches_a_maildir_with_its_header_completed(mx: Server) -> None:
    marker = unique("local")
    body = b"caf\xe9 \xff\x80 stays 8-bit\n\ttabbed line\n"
    injected(sendmail(mx.home, ALICE, message=f"Subject: {marker}\n\n".encode() + body))

    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    lines, stored_body = header_and_body(stored)
    assert stored_body == body
    assert lines[:2] == [f"Return-Path: <cron@{ME}>".encode(), f"Delivered-To: {ALICE}".encode()]
    invoked = INVOKED.fullmatch(lines[2] + b"\n")
    assert invoked is not None and int(invoked.group(1)) == UID, lines
    parsedate_to_datetime(invoked.group(2).decode())
    assert lines[3] == f"Subject: {marker}".encode()
    assert fields_named(lines, b"From") == [f"From: cron@{ME}".encode()]
    (date,) = fields_named(lines, b"Date")
    parsedate_to_datetime(date[5:].decode())
    (message_id,) = fields_named(lines, b"Message-ID")
    assert re.fullmatch(rb"Message-ID: <[^<>@ ]+@" + re.escape(ME.encode()) + rb">", message_id)
    queued_size = len(stored) - len(lines[0]) - len(lines[1]) - 2  # without what delivery added
    info = re.compile(rf"info msg \d+: bytes {queued_size} from <cron@{re.escape(ME)}> qp \d+ uid {UID}\n")
    wait_until(lambda: info.search(mx.log), "qmail-send's info line with the injecting uid")
    assert todo_files(mx.home) == []


def test_t_sends_to_to_cc_and_bcc_and_removes_bcc(mx: Server, sink: FakeSMTP) -> None:
    marker = unique("php")
    to = f"someone@{REMOTE}"
    message = (f"To: Some One <{to}>\r\nCc: {ALICE}\r\nBcc: {BOB}\r\nSubject: {marker}\r\n"
               f"\r\nsent like PHP's mail()\r\n").encode()
    # PHP runs sendmail_path and appends mail()'s fifth argument.
    injected(sendmail(mx.home, "-t", "-i", "-fwww@example.test", message=message))

    relayed = sink.wait_for(marker.encode())
    assert (relayed.sender, relayed.recipients) == ("www@example.test", [to])
    assert b"Bcc:" not in relayed.data and BOB.encode() not in relayed.data
    assert b"\r\nFrom: www@example.test\r\n" in relayed.data
    assert relayed.data.endswith(b"\r\n\r\nsent like PHP's mail()\r\n")
    for address in (ALICE, BOB):
        stored = mx.home.wait_for_message(mx.home.maildir(address), marker.encode())
        lines, body = header_and_body(stored)
        assert lines[0] == b"Return-Path: <www@example.test>"
        assert fields_named(lines, b"Bcc") == [] and b"\r" not in stored
        assert fields_named(lines, b"Cc") == [f"Cc: {ALICE}".encode()]
        assert body == b"sent like PHP's mail()\n"


def test_lone_dot_ends_the_message_unless_i_is_given(mx: Server) -> None:
    cut, whole = unique("dot-ends"), unique("dot-kept")
    text = b"\r\nbefore\r\n.\r\nafter\r\n"
    injected(sendmail(mx.home, ALICE, message=f"Subject: {cut}".encode() + text))
    injected(sendmail(mx.home, "-oi", ALICE, message=f"Subject: {whole}".encode() + text))

    _, body = header_and_body(mx.home.wait_for_message(mx.home.maildir(ALICE), cut.encode()))
    assert body == b"before\n"
    _, body = header_and_body(mx.home.wait_for_message(mx.home.maildir(ALICE), whole.encode()))
    assert body == b"before\n.\nafter\n"


def test_given_fields_are_kept_and_return_path_is_dropped(mx: Server) -> None:
    marker = unique("kept")
    given = [b"From: Some Body <some@example.org>", b"Date: Tue, 01 Dec 2026 10:00:00 +0100",
             f"Message-ID: <{marker}@example.org>".encode(), b"Return-Path: <forged@example.org>",
             f"Subject: {marker}".encode()]
    injected(sendmail(mx.home, ALICE, message=b"\n".join(given) + b"\n\nbody\n"))

    lines, _ = header_and_body(mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode()))
    assert fields_named(lines, b"Return-Path") == [f"Return-Path: <cron@{ME}>".encode()]
    assert lines[3:] == [line for line in given if not line.startswith(b"Return-Path")]


def test_cron_style_call_with_full_name_and_unqualified_recipient(mx: Server) -> None:
    marker = unique("cron")
    # Debian's cron: sendmail -FCronDaemon -i -B8BITMIME -oem USER
    injected(sendmail(mx.home, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "postmaster",
                      message=f"Subject: {marker}\n\nCron <root@host> job output\n".encode(),
                      QMAILUSER="jobs", QMAILHOST="example.test"))

    # postmaster has no '@': it is postmaster@envnoathost (me), qmail's ~alias.
    lines, _ = header_and_body(mx.home.wait_for_message(mx.home.path / "alias" / "Maildir", marker.encode()))
    assert lines[0] == b"Return-Path: <jobs@example.test>"
    assert lines[1] == f"Delivered-To: postmaster@{ME}".encode()
    assert fields_named(lines, b"From") == [b"From: CronDaemon <jobs@example.test>"]


def test_null_sender_and_addresses_in_angle_brackets(mx: Server) -> None:
    marker = unique("null")
    injected(sendmail(mx.home, "-f", "<>", f"<{ALICE}>", message=f"Subject: {marker}\n\nx\n".encode()))
    lines, _ = header_and_body(mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode()))
    assert lines[0] == b"Return-Path: <>"
    assert fields_named(lines, b"From") == [f"From: cron@{ME}".encode()]


# -- errors -----------------------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "message", "words"), [
    ((), b"Subject: x\n\nno one to send to\n", "no recipients"),
    (("-t",), b"Subject: x\n\n-t but no To:\n", "no recipients"),
    (("-bs",), b"", "-bs is not supported"),
    (("-bp",), b"", "-bp is not supported"),
    (("-q",), b"", "-q is not supported"),
    (("-k", ALICE), b"x\n", "unknown option -k"),
    ((ALICE, "-f"), b"x\n", "option -f needs a value"),
    (("a\x01b@example.test",), b"x\n", "control characters"),
])
def test_errors_say_what_is_wrong_in_one_line_and_leave_nothing(tmp_path: Path, arguments, message, words) -> None:
    home = make_home(tmp_path)
    result = sendmail(home, *arguments, message=message)
    assert result.returncode == 1, result
    assert result.stderr.decode().startswith("qtwist: sendmail: ") and words in result.stderr.decode()
    assert result.stderr.count(b"\n") == 1, result.stderr
    assert todo_files(home) == []


def test_a_todo_directory_that_cannot_be_made_is_an_error(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    (home.path / "queue").write_text("not a directory\n")
    result = sendmail(home, ALICE, message=b"Subject: x\n\nx\n")
    assert result.returncode == 1, result
    assert result.stderr.decode().startswith(f"qtwist: sendmail: cannot leave the message in {home.path}/queue/todo")
    assert result.stderr.count(b"\n") == 1, result.stderr


# -- without a server -------------------------------------------------------------

def test_messages_wait_while_no_server_runs_and_go_at_its_start(tmp_path: Path, sink: FakeSMTP) -> None:
    home = routed_home(tmp_path, sink)
    local, remote = unique("waiting-local"), unique("waiting-remote")
    injected(sendmail(home, ALICE, message=f"Subject: {local}\n\nx\n".encode()))
    (waiting,) = todo_files(home)
    # The file's owner is who injected it; as root, pretend to be nobody.
    owner = 65534 if os.geteuid() == 0 else UID
    os.chown(waiting, owner, -1)
    injected(sendmail(home, f"far@{REMOTE}", message=f"Subject: {remote}\n\nx\n".encode()))
    assert home.qstat() == (0, 2)
    assert home.qread() == ""

    with Server(home) as server:
        stored = home.wait_for_message(home.maildir(ALICE), local.encode())
        assert sink.wait_for(remote.encode()).recipients == [f"far@{REMOTE}"]
        wait_until(lambda: home.qstat() == (0, 0), "an empty queue and todo/")
        invoked = INVOKED.search(stored)
        assert invoked is not None and int(invoked.group(1)) == owner, stored
        info = re.compile(rf"info msg \d+: bytes \d+ from <cron@{re.escape(ME)}> qp \d+ uid {owner}\n")
        wait_until(lambda: info.search(server.log), "qmail-send's info line with the file owner's uid")


def test_a_flood_of_waiting_messages_is_taken_batch_after_batch(tmp_path: Path, sink: FakeSMTP) -> None:
    home = routed_home(tmp_path, sink)
    count = TODO_BATCH_FILES + 50
    for number in range(count):
        drop_todo(home.path, "cron@example.test", [ALICE], b"Subject: flood %d\n\nx\n" % number)
    assert home.qstat() == (0, count)

    with Server(home):
        wait_until(lambda: len(home.mailbox(home.maildir(ALICE))) == count, f"{count} messages for alice", 60)
        wait_until(lambda: home.qstat() == (0, 0), "an empty queue and todo/")


def test_a_file_that_is_no_message_is_moved_aside_and_the_rest_delivered(tmp_path: Path, sink: FakeSMTP) -> None:
    home = routed_home(tmp_path, sink)
    todo = home.path / "queue" / "todo"
    todo.mkdir(parents=True)
    (todo / "1.junk").write_bytes(b"garbage, not from qtwist sendmail\n")
    marker = unique("after-junk")
    injected(sendmail(home, ALICE, message=f"Subject: {marker}\n\nx\n".encode()))

    with Server(home) as server:
        home.wait_for_message(home.maildir(ALICE), marker.encode())
        server.wait_for_log("queue/todo/1.junk: cannot be queued (not a qtwist sendmail file); "
                            "moved to queue/corrupt/1.junk.")
        assert [p.name.partition(".junk")[0] for p in (home.path / "queue" / "corrupt").iterdir()] == ["1"]
        assert todo_files(home) == []
        assert "Traceback" not in server.log
