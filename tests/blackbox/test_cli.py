"""The ``qtwist`` command, run for real as ``python -m qtwist``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtwist.cli import _printable, _qread_date
from qtwist.queue.records import Records, queue_key
from qtwist.users import UserDB

REPO = Path(__file__).resolve().parents[2]


def qtwist(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "qtwist", "--home", str(home), *args],
                          input=stdin, capture_output=True, text=True, env=env, timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def fails(result: subprocess.CompletedProcess, status: int, words: str) -> None:
    """A user error: the status, and one stderr line (argparse's usage aside) saying what."""
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert words in last, result.stderr
    if status == 1:
        assert result.stderr.count("\n") == 1, result.stderr


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "control").mkdir()
    return tmp_path


def test_domain_add_list_del(home):
    assert ok(qtwist(home, "domain", "add", "Example.TEST")) == ""
    ok(qtwist(home, "domain", "add", "other.test"))
    assert (home / "domains" / "example.test" / "vpasswd").exists()
    assert (home / "control" / "rcpthosts").read_text() == "example.test\nother.test\n"
    assert ok(qtwist(home, "domain", "list")) == "example.test\nother.test\n"
    ok(qtwist(home, "domain", "del", "example.test"))
    assert ok(qtwist(home, "domain", "list")) == "other.test\n"
    assert (home / "control" / "rcpthosts").read_text() == "other.test\n"


def test_user_add_list_passwd_del(home):
    ok(qtwist(home, "domain", "add", "example.test"))
    ok(qtwist(home, "domain", "add", "other.test"))
    ok(qtwist(home, "user", "add", "alice@example.test", "--password", "secret"))
    ok(qtwist(home, "user", "add", "bob@other.test", "--password", "pw", "--quota", "5000000",
              "--cleartext"))
    assert ok(qtwist(home, "user", "list")) == "alice@example.test\nbob@other.test\n"
    assert ok(qtwist(home, "user", "list", "other.test")) == "bob@other.test\n"
    db = UserDB(home)
    assert db.authenticate("alice@example.test", "secret").cleartext == ""
    bob = db.lookup("bob@other.test")
    assert (bob.quota_bytes, bob.cleartext) == (5000000, "pw")
    assert (home / "domains" / "example.test" / "alice" / "Maildir" / "new").is_dir()

    ok(qtwist(home, "user", "passwd", "alice@example.test", "--password", "changed"))
    assert db.authenticate("alice@example.test", "changed") is not None
    assert db.authenticate("alice@example.test", "secret") is None

    ok(qtwist(home, "user", "del", "alice@example.test"))
    assert ok(qtwist(home, "user", "list")) == "bob@other.test\n"
    assert not (home / "domains" / "example.test" / "alice").exists()


def test_password_stdin_reads_one_line_and_is_never_echoed(home):
    ok(qtwist(home, "domain", "add", "example.test"))
    result = qtwist(home, "user", "add", "alice@example.test", "--password-stdin",
                    stdin="  pass word \nsecond line\n")
    assert "pass word" not in ok(result) + result.stderr
    assert UserDB(home).authenticate("alice@example.test", "  pass word ") is not None
    result = qtwist(home, "user", "passwd", "alice@example.test", "--password-stdin",
                    "--cleartext", stdin="next\r\n")
    assert "next" not in ok(result)
    assert UserDB(home).lookup("alice@example.test").cleartext == "next"
    ok(qtwist(home, "user", "passwd", "alice@example.test", "--password", "n2",
              "--no-cleartext"))
    assert UserDB(home).lookup("alice@example.test").cleartext == ""


def test_user_errors_say_what_is_wrong_and_exit_1(home, tmp_path):
    ok(qtwist(home, "domain", "add", "example.test"))
    ok(qtwist(home, "user", "add", "alice@example.test", "--password", "pw"))
    fails(qtwist(home, "user", "add", "alice@example.test", "--password", "pw"),
          1, "alice@example.test already exists")
    fails(qtwist(home, "user", "add", "x@nope.test", "--password", "pw"),
          1, "nope.test does not exist")
    fails(qtwist(home, "user", "add", "a b@example.test", "--password", "pw"),
          1, "invalid user name")
    fails(qtwist(home, "user", "del", "bob@example.test"), 1, "bob@example.test does not exist")
    fails(qtwist(home, "user", "passwd", "bob@example.test", "--password", "pw"),
          1, "bob@example.test does not exist")
    fails(qtwist(home, "user", "list", "nope.test"), 1, "nope.test does not exist")
    fails(qtwist(home, "domain", "add", "example.test"), 1, "example.test already exists")
    fails(qtwist(home, "domain", "add", "../etc"), 1, "invalid domain name")
    fails(qtwist(home, "domain", "del", "nope.test"), 1, "nope.test does not exist")
    fails(qtwist(home, "user", "add", "carol@example.test"), 1, "--password-stdin")
    fails(qtwist(home, "user", "add", "carol@example.test", "--password-stdin"),
          1, "no password on standard input")
    fails(qtwist(tmp_path / "missing", "domain", "list"), 1, "does not exist")


def test_usage_errors_exit_2(home):
    ok(qtwist(home, "domain", "add", "example.test"))
    fails(qtwist(home, "user", "add", "a@example.test", "--password", "pw", "--quota", "lots"),
          2, "--quota")
    fails(qtwist(home, "user", "add", "a@example.test", "--password", "pw", "--quota", "0"),
          2, "--quota")
    fails(qtwist(home, "user", "add", "a@example.test", "--password", "pw",
                 "--password-stdin"), 2, "not allowed with")
    fails(qtwist(home), 2, "required")
    fails(qtwist(home, "frobnicate"), 2, "invalid choice")
    fails(qtwist(home, "queue", "rm"), 2, "not both or neither")
    fails(qtwist(home, "queue", "rm", "12", "--match", "x"), 2, "not both or neither")
    assert UserDB(home).lookup("a@example.test") is None


def test_qread_date_is_qmails_date822fmt_without_the_zone():
    assert _qread_date(0) == "1 Jan 1970 00:00:00"
    assert _qread_date(1795461414.7) == "23 Nov 2026 19:16:54"
    assert _printable("a\tb\u00e9c~") == "a_b_c~"


def queue_records(home: Path) -> Records:
    """The queue's own record writer, keyed as the server keys it."""
    (home / "queue" / "seg").mkdir(parents=True, exist_ok=True)
    return Records(queue_key(home / "queue", create=True).key)


def write_segment(home: Path, *records: bytes) -> None:
    """A queue segment as the server leaves it."""
    (home / "queue" / "seg" / "000000000001").write_bytes(b"".join(records))


def test_qstat_and_qread_on_an_empty_queue(home):
    assert ok(qtwist(home, "qstat")) == (
        "messages in queue: 0\nmessages in queue but not yet preprocessed: 0\n")
    assert ok(qtwist(home, "qread")) == ""


def test_qread_prints_qmail_qreads_format(home):
    from qtwist.queue import DELIVERED, Recipient

    records = queue_records(home)
    (home / "domains" / "example.test").mkdir(parents=True)  # qread routes as the server does
    first = [Recipient("bob@remote.test"), Recipient("alice@example.test"),
             Recipient("carol@remote.test", DELIVERED, "ok")]
    write_segment(home,
                  records.message(7, 1795461414.0, "alice@example.test", first, b"Subject: a\n\nhi\n")[0],
                  records.result(7, 2, first[2]),
                  records.message(8, 1795461415.0, "", [Recipient("x\ty@remote.test")], b"x\n")[0])
    assert ok(qtwist(home, "qstat")).startswith("messages in queue: 2\n")
    assert ok(qtwist(home, "qread")).splitlines() == [
        "23 Nov 2026 19:16:54 GMT  #7  15  <alice@example.test> ",
        "\tlocal\talice@example.test",
        "\tremote\tbob@remote.test",
        "  done\tremote\tcarol@remote.test",
        "23 Nov 2026 19:16:55 GMT  #8  2  <> ",
        "\tremote\tx_y@remote.test",
    ]


def test_queue_rm_by_id_and_by_match(home):
    from qtwist.queue import Recipient

    envelopes = [("a@example.test", "b@r.test"), ("spam@bad.test", "c@r.test"),
                 ("d@example.test", "e@bad.test")]
    records = queue_records(home)
    write_segment(home, *(records.message(number, 1795461414.0 + number, sender, [Recipient(recipient)], b"x\n")[0]
                          for number, (sender, recipient) in enumerate(envelopes, 1)))
    assert ok(qtwist(home, "queue", "rm", "1")) == "removed 1 message(s)\n"
    assert ok(qtwist(home, "queue", "rm", "--match", "BAD.test")) == "removed 2 message(s)\n"
    assert ok(qtwist(home, "qstat")).startswith("messages in queue: 0\n")
    fails(qtwist(home, "queue", "rm", "99"), 1, "no message 99 in the queue")


def test_queue_flush_needs_a_queue(home):
    fails(qtwist(home, "queue", "flush"), 1, "does not exist")
    (home / "queue").mkdir()
    assert ok(qtwist(home, "queue", "flush")) == ""


def test_showctl_marks_defaults_and_reports_bad_files(home):
    (home / "control" / "databytes").write_text("12345\n")
    (home / "control" / "rcpthosts").write_text("a.test\nb.test\n")
    lines = ok(qtwist(home, "showctl")).splitlines()
    assert "databytes: 12345" in lines
    assert "queuelifetime: 604800 (default)" in lines
    assert lines[lines.index("rcpthosts: a.test") + 1] == "    b.test"
    (home / "control" / "concurrencylocal").write_text("lots\n")
    result = qtwist(home, "showctl")
    assert result.returncode == 1 and "concurrencylocal: 10 (default)" in result.stdout
    assert "control/concurrencylocal" in result.stderr and "Traceback" not in result.stderr


def test_showctl_explain_says_what_each_setting_is_for(home):
    lines = ok(qtwist(home, "showctl", "--explain")).splitlines()
    settings = [index for index, line in enumerate(lines) if not line.startswith(("#", "    "))]
    assert settings and all(lines[index - 1].startswith("# ") for index in settings)
    assert lines[lines.index("databytes: 0 (unlimited) (default)") - 1] == (
        "# the largest message accepted, in bytes; 0: no limit")
